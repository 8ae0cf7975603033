"""Reading checkpoints safely, and deciding whether one may be resumed: no pickled code, nothing truncated, nothing
written for another model or manifest.

- Safe loading. torch.distributed.checkpoint (DCP, torch 2.14) reads tensors with `torch.load(weights_only=True)`,
  but its `.metadata` file with plain `pickle.load` and its non-tensor items (the optimizer's `param_groups`) with
  `torch.load(weights_only=False)`: a planted file there would run code. `SafeFileSystemReader`/`SafeFsspecReader`
  read the metadata with an unpickler that admits only DCP's metadata classes, torch.Size and dtypes;
  `SafeLoadPlanner`/`SafeKeysLoadPlanner` read every non-tensor item with `weights_only=True`. Anything else is refused
  with `UnsafeCheckpoint`, before any of it runs.
- Integrity (`damage`): every file the metadata names exists and is long enough for the bytes it should hold; every
  rank's train state loads. A damaged checkpoint is one that storage lost bytes of after its marker was written.
- Compatibility (`differences`, `shape_differences`): what a checkpoint was written for (its manifest.yaml, its
  tensors' shapes) against this run. The fields in REFUSED decide what the weights and optimizer state mean; every
  other field (budget, logging, cluster and the number of ranks, checkpoint, data location, learning rate and the other
  hyperparameters, loss weights) may change between jobs of one run.
"""

from __future__ import annotations

import io
import pickle
import re

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata


class UnsafeCheckpoint(Exception):
    """A checkpoint file holds a pickled object that is not plain data (loading it could run code)."""


# ------------------------------------------------------------------ safe loading

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_DCP_METADATA, n) for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                         "BytesStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                                         "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a torch.layout by its name
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"it refers to {module}.{name}, which a checkpoint's metadata never holds")


def read_metadata_bytes(data: bytes, where: str):
    """DCP's Metadata from the bytes of a `.metadata` file, admitting only the classes DCP writes there."""
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{where} is not a checkpoint's metadata: {e}; loading it could run code, so it is "
                               f"refused") from None


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def torch_load(source, where: str):
    """torch.load(weights_only=True): plain data and tensors only. UnsafeCheckpoint names what else was in it."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found is None:  # not a refused global: a garbled or truncated file, for the caller to report
            raise
        name = found.group(1)
        name = name if "." in name or not name else f"builtins.{name}"  # torch names builtins without their module
        raise UnsafeCheckpoint(f"{where} holds a pickled object that is not plain data"
                               f"{' (' + name + ')' if name else ''}; loading it could run code, so it is "
                               f"refused (weights_only)") from None


class _SafeMetadata:
    """Mixin for DCP's readers: the metadata through the restricted unpickler (DCP's own uses pickle.load)."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = read_metadata_bytes(f.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    pass


def safe_fsspec_reader(path: str, **storage_options):
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    class SafeFsspecReader(_SafeMetadata, FsspecReader):
        pass

    return SafeFsspecReader(path, **storage_options)


class _SafeBytes:
    """Mixin for DCP's load planners: non-tensor items (param_groups, ...) with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch_load(value, f"the checkpoint item {read_item.dest_index.fqn}")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    pass


class SafeKeysLoadPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    pass


# ------------------------------------------------------------------ integrity


def damage(metadata, sizes: dict[str, int]) -> str | None:
    """What is missing or short, given the metadata and the sizes of the checkpoint's files; None when whole."""
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, n in sorted(need.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] < n:
            return f"{name} is truncated ({sizes[name]} bytes, its metadata needs at least {n})"
    return None


# ------------------------------------------------------------------ compatibility

# Prefixes of the manifest's flattened keys (config.to_dict, then `a.b`, `stages[0].name`) that a checkpoint must
# share with the run resuming it: the network, the text it reads, the optimizer whose state it holds, the stages.
REFUSED = ("model.", "data.text.encoder", "data.text.dim", "data.text.model", "optimizer.name", "stages[")
STAGE_KEYS = (".name", ".resolution")  # of stages[i]: their number, order, names and resolutions; steps may change


def flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out[f"{prefix}.count"] = len(d)
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out


def _refused(key: str) -> bool:
    if key.startswith("stages"):
        return key == "stages.count" or key.endswith(STAGE_KEYS)
    return key.startswith(REFUSED)


def _resolved_model(manifest: dict) -> dict:
    """The manifest with its model section as the network it builds: the preset's sizes with the overrides applied
    (the preset's name itself is not compared: two spellings of one network are the same network)."""
    from pixeldiff.presets import PRESETS

    model = dict(manifest.get("model") or {})
    preset = PRESETS.get(model.pop("preset", None), {})
    return {**manifest, "model": {**preset, **{k: v for k, v in model.items() if v is not None}}}


def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, in the checkpoint's manifest, in this one) for each refused field that differs."""
    a, b = flatten(_resolved_model(saved)), flatten(_resolved_model(current))
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys(), key=_key_order)
            if _refused(k) and a.get(k) != b.get(k)]


def _key_order(k: str):
    return (k != "stages.count", k)


def shape_differences(metadata, expected: dict[str, tuple]) -> list[str]:
    """The tensors of `expected` (DCP key -> shape, e.g. model.blocks.0.attn.qkv.weight) missing from the checkpoint
    or with another shape there, and the checkpoint's tensors of the same parts that this run does not have."""
    saved = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    parts = {k.split(".", 1)[0] for k in expected}
    out = []
    for k, shape in expected.items():
        if k not in saved:
            out.append(f"{k} is not in the checkpoint")
        elif saved[k] != tuple(shape):
            out.append(f"{k} has shape {list(saved[k])} there, {list(shape)} here")
    out += [f"{k} is in the checkpoint but not in this model" for k in saved
            if k.split(".", 1)[0] in parts and k not in expected]
    return out


def tensor_shapes(state: dict, parts=("model", "ema")) -> dict[str, tuple]:
    """DCP key -> global shape of the tensors of the flat state dicts `state[part]` (DTensors: their global shape)."""
    return {f"{p}.{k}": tuple(v.shape) for p in parts if p in state for k, v in state[p].items() if torch.is_tensor(v)}


def state_nbytes(state) -> int:
    """Bytes of the tensors in a nested state (global sizes for DTensors): about what a save of it writes."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    if hasattr(state, "state_dict"):
        return state_nbytes(state.state_dict())
    return 0
