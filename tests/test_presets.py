"""The model's sizes without torch (pixeldiff/presets.py) agree with the network torch builds."""

import pytest
import torch

from pixeldiff.model import PixelDiT
from pixeldiff.presets import PRESETS, ModelConfig, param_count


@pytest.mark.parametrize("cfg", [ModelConfig(name) for name in PRESETS]
                         + [ModelConfig("tiny", depth=3, mlp_ratio=2.5, bottleneck=48, patch_size=16)])
@pytest.mark.parametrize("text_dim", [64, 768])
def test_param_count_is_the_networks(cfg, text_dim):
    with torch.device("meta"):
        net = PixelDiT(cfg, text_dim)
    assert param_count(cfg, text_dim) == net.num_params()
