"""The online Hugging Face text encoder in training, with a stand-in `transformers` (no network, no weights)."""

import sys

import pytest

from launcher.cli import main as launch_main
from pixeldiff.config import ConfigError, TextConfig
from pixeldiff.ledger import read_jsonl
from pixeldiff.text import make_text_encoder
from test_tools_shards import FAKE_TRANSFORMERS


@pytest.fixture
def fake_transformers(tmp_path, monkeypatch):
    pkg = tmp_path / "fakehf" / "transformers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_TRANSFORMERS)
    monkeypatch.syspath_prepend(str(tmp_path / "fakehf"))
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    yield
    sys.modules.pop("transformers", None)


def test_hf_encoder_embeds_with_the_model_width_and_mask(fake_transformers):
    enc = make_text_encoder(TextConfig(encoder="hf", model="fake/encoder", max_tokens=5, dim=12), "cpu")
    emb, mask = enc.encode(["a red circle", ""])
    assert emb.shape == (2, 5, 12) and mask.tolist() == [[True] * 3 + [False] * 2, [False] * 5]
    with pytest.raises(ConfigError, match=r"data.text.dim: 64, but 'fake/encoder' produces 12-wide .*set data.text.dim=12"):
        make_text_encoder(TextConfig(encoder="hf", model="fake/encoder", max_tokens=5, dim=64), "cpu")
    with pytest.raises(ConfigError, match=r"data.text.model: cannot load the Hugging Face model 'nope/model'"):
        make_text_encoder(TextConfig(encoder="hf", model="nope/model", max_tokens=5, dim=12), "cpu")


def test_training_and_sampling_with_an_online_hf_encoder(fake_transformers, write_manifest, tmp_path, capsys):
    text = {"encoder": "hf", "model": "fake/encoder", "max_tokens": 6, "dim": 12}
    manifest = write_manifest(name="hfrun", steps=(4, 2), data={"text": text})
    assert launch_main(["run", str(manifest), "--runs-dir", str(tmp_path)]) == 0
    assert read_jsonl(tmp_path / "hfrun" / "metrics.jsonl")[-1]["step"] == 6
    from pixeldiff.sample import main as sample_main

    out = tmp_path / "grid.png"
    assert sample_main([str(tmp_path / "hfrun"), "--prompt", "a red circle", "--out", str(out), "--steps", "2"]) == 0
    assert out.exists()
