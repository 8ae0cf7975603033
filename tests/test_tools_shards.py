"""tools/make_shards.py and tools/embed_captions.py, run as a user would (subprocesses),
locally and against a real S3 endpoint (moto's server on 127.0.0.1, see s3server.py)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from s3server import create_bucket, get_object, list_keys

REPO = Path(__file__).resolve().parents[1]
MAKE = REPO / "tools" / "make_shards.py"
EMBED = REPO / "tools" / "embed_captions.py"
RESIZE = 32
KEY_RE = re.compile(r"^\d{6}_\d{6}$")


def run_tool(script: Path, *args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# --------------------------------------------------------------------------- the input folder

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """30 inputs: 28 captioned images (jpg/png/webp, some in a subfolder), 1 corrupt, 1 without caption."""
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(7)
    expected = {}  # rel -> caption as it must appear in the shards
    for i in range(28):
        ext = ("jpg", "png", "webp")[i % 3] if i % 7 else "jpeg"
        rel = f"{'sub/' if i >= 20 else ''}img_{i:02d}.{ext}"
        w, h = (int(v) for v in rng.integers(20, 72, size=2))
        if i % 5 == 0:
            w, h = 24, 30  # never resized
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = src / rel
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(path, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
        caption = f"Photo {i}: a naïve café — {'word ' * (i % 9)}end"
        (path.with_suffix(".txt")).write_text(f"  {caption}\n", encoding="utf-8")
        expected[rel] = caption
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    (src / "broken.txt").write_text("a broken image", encoding="utf-8")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(src / "uncaptioned.png")
    (src / "notes.md").write_text("not an image, ignored")
    return src, expected


def read_shard(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples_of(members: list[tuple[str, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    """Groups members by key and checks that each key's members are adjacent."""
    out, seen = [], set()
    for name, data in members:
        key, ext = name.split(".", 1)
        if out and out[-1][0] == key:
            out[-1][1][ext] = data
        else:
            assert key not in seen, f"members of {key} are not adjacent"
            seen.add(key)
            out.append((key, {ext: data}))
    return out


def packing_order(src: Path, expected, seed: int | None = 0) -> list[str]:
    """The packed inputs in the tool's order: shuffled with `seed` (the default 0), or sorted (None)."""
    if seed is None:
        return sorted(expected)
    tool = load_tool("make_shards")
    return [e.rel for e in tool.shuffled(tool.scan_folder(src), seed) if e.rel in expected]


def check_shards(shards: list[bytes], dataset, resize: int | None, max_samples: int) -> None:
    src, expected = dataset
    order = packing_order(src, expected)
    got = []
    for s, data in enumerate(shards):
        samples = samples_of(read_shard(data))
        assert 0 < len(samples) <= max_samples
        for j, (key, members) in enumerate(samples):
            assert KEY_RE.match(key) and key == f"{s:06d}_{j:06d}"
            got.append((key, members))
    assert len(got) == len(order) == 28
    for (key, members), rel in zip(got, order):
        assert set(members) in ({"jpg", "txt"}, {"png", "txt"}, {"webp", "txt"}), (key, set(members))
        assert members["txt"].decode("utf-8") == expected[rel]
        ext = next(e for e in members if e != "txt")
        original = (src / rel).read_bytes()
        with Image.open(src / rel) as im:
            ow, oh = im.size
        with Image.open(io.BytesIO(members[ext])) as im:
            im.load()
            w, h = im.size
            fmt = im.format
        if resize and min(ow, oh) > resize:
            assert ext == "jpg" and fmt == "JPEG"
            assert min(w, h) == resize
            assert abs(max(w, h) - max(ow, oh) * resize / min(ow, oh)) <= 1
            assert (w >= h) == (ow >= oh)
        else:
            assert members[ext] == original, f"{rel}: bytes changed without a resize"
            assert ext == {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]


def local_shards(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(prefix.name + "-*.tar"))


# --------------------------------------------------------------------------- make_shards, local

def test_make_shards_folder_resize_and_counts(dataset, tmp_path):
    src, _ = dataset
    prefix = tmp_path / "out" / "train"
    proc = ok(run_tool(MAKE, src, prefix, "--max-samples", 8, "--resize", RESIZE, "--workers", 2))
    files = local_shards(prefix)
    assert [f.name for f in files] == [f"train-{i:06d}.tar" for i in range(4)]  # 8 + 8 + 8 + 4
    check_shards([f.read_bytes() for f in files], dataset, RESIZE, 8)
    assert any(min(Image.open(f).size) > RESIZE for f in src.rglob("img_*")), "the data must exercise --resize"
    assert any(min(Image.open(f).size) <= RESIZE for f in src.rglob("img_*"))
    assert "skipped unreadable images: 1" in proc.stdout
    assert "broken.jpg" in proc.stdout
    assert "skipped images without a caption: 1" in proc.stdout and "uncaptioned.png" in proc.stdout
    assert "28 samples in 4 shards" in proc.stdout
    assert f"data.shards: {prefix}-{{000000..000003}}.tar" in proc.stdout.splitlines()
    assert "packing" in proc.stderr  # a progress display
    state = json.loads(prefix.with_name("train.progress.json").read_text())
    assert state["complete"] is True and state["inputs"] == 30
    assert [r["samples"] for r in state["shards"]] == [8, 8, 8, 4]
    assert [r["bytes"] for r in state["shards"]] == [f.stat().st_size for f in files]
    assert [rel for r in state["shards"] for rel in r["files"]] == packing_order(*dataset)
    assert [s[0] for r in state["shards"] for s in r["skipped"]["unreadable"]] == ["broken.jpg"]
    assert [s[0] for r in state["shards"] for s in r["skipped"]["no_caption"]] == ["uncaptioned.png"]
    assert not list(tmp_path.rglob("*.partial"))


def test_make_shards_no_resize_keeps_bytes_and_shard_size(dataset, tmp_path):
    prefix = tmp_path / "train"
    limit = 40_000
    proc = ok(run_tool(MAKE, dataset[0], prefix, "--shard-size", "40KB", "--workers", 0, "--quiet"))
    files = local_shards(prefix)
    assert len(files) > 2
    assert all(f.stat().st_size <= limit for f in files), [f.stat().st_size for f in files]
    # Greedy packing: the next shard's first sample would not have fitted.
    shards = [f.read_bytes() for f in files]
    check_shards(shards, dataset, None, 10**6)
    for a, b in zip(shards, shards[1:]):
        first = samples_of(read_shard(b))[0][1]
        extra = sum(512 + -(-len(v) // 512) * 512 for v in first.values())
        used = sum(512 + -(-len(v) // 512) * 512 for _, v in read_shard(a)) + 1024
        assert -(-(used + extra) // 10240) * 10240 > limit
    assert proc.stderr == ""  # --quiet


def test_make_shards_resume_is_byte_identical(dataset, tmp_path):
    src, _ = dataset
    args = ("--max-samples", 8, "--resize", RESIZE, "--quiet")
    one = tmp_path / "one" / "train"
    ok(run_tool(MAKE, src, one, *args))
    reference = [f.read_bytes() for f in local_shards(one)]
    assert len(reference) == 4

    two = tmp_path / "two" / "train"
    proc = ok(run_tool(MAKE, src, two, *args, "--stop-after-shards", 2))
    assert [f.name for f in local_shards(two)] == ["train-000000.tar", "train-000001.tar"]
    assert "stopped" in proc.stdout and "rerun" in proc.stdout
    state = json.loads(two.with_name("train.progress.json").read_text())
    assert state["complete"] is False and len(state["shards"]) == 2
    first_two = [f.stat().st_mtime_ns for f in local_shards(two)]

    proc = ok(run_tool(MAKE, src, two, *args))
    assert "resuming: 2 shards done" in proc.stderr
    assert [f.read_bytes() for f in local_shards(two)] == reference
    assert [f.stat().st_mtime_ns for f in local_shards(two)][:2] == first_two  # not rewritten

    # A lost last shard and a truncated one are both detected and rewritten.
    local_shards(two)[3].unlink()
    shard1 = local_shards(two)[1]
    shard1.write_bytes(shard1.read_bytes()[:5000])
    proc = ok(run_tool(MAKE, src, two, *args))
    assert "train-000001.tar" in proc.stderr
    assert [f.read_bytes() for f in local_shards(two)] == reference

    # Done already: nothing rewritten.
    before = [f.stat().st_mtime_ns for f in local_shards(two)]
    proc = ok(run_tool(MAKE, src, two, *args))
    assert [f.stat().st_mtime_ns for f in local_shards(two)] == before
    assert "data.shards:" in proc.stdout

    # Other options refuse to mix with the recorded shards; --restart starts over.
    proc = run_tool(MAKE, src, two, "--max-samples", 5, "--quiet")
    assert proc.returncode == 2 and "--restart" in proc.stderr and "Traceback" not in proc.stderr
    ok(run_tool(MAKE, src, two, "--max-samples", 5, "--quiet", "--restart"))
    assert len(local_shards(two)) == 6  # 28 samples / 5


def test_make_shards_captions_files(dataset, tmp_path):
    src, expected = dataset
    rels = sorted(expected)[:10]
    rows = [{"file": rel, "caption": f"caption, with \"quotes\" for {rel}"} for rel in rels]
    rows.append({"file": "does/not/exist.jpg", "caption": "gone"})
    rows.append({"file": "broken.jpg", "caption": "broken"})
    rows.append({"file": sorted(expected)[12], "caption": " "})  # an empty caption
    csv_path = tmp_path / "caps.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "caption"])
        writer.writeheader()
        writer.writerows(rows[::-1])  # the tool sorts
    jsonl_path = tmp_path / "caps.jsonl"
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    outputs = []
    for caps in (csv_path, jsonl_path):
        prefix = tmp_path / caps.suffix[1:] / "train"
        proc = ok(run_tool(MAKE, src, prefix, "--captions", caps, "--max-samples", 4, "--quiet", "--no-shuffle"))
        assert "skipped listed files that do not exist: 1" in proc.stdout
        assert "skipped unreadable images: 1" in proc.stdout
        assert "skipped images without a caption: 1" in proc.stdout
        shards = [f.read_bytes() for f in local_shards(prefix)]
        samples = [m for data in shards for _, m in samples_of(read_shard(data))]
        assert [m["txt"].decode() for m in samples] == [f"caption, with \"quotes\" for {rel}" for rel in rels]
        outputs.append(shards)
    assert outputs[0] == outputs[1]  # CSV and JSONL with the same content give the same shards


def test_make_shards_shuffles_with_a_seed_a_pure_function_of_the_sorted_inputs(dataset, tmp_path):
    src, expected = dataset
    orders = {}
    for name, extra in (("seed0", ()), ("seed1", ("--seed", 1)), ("sorted", ("--no-shuffle",))):
        prefix = tmp_path / name / "train"
        ok(run_tool(MAKE, src, prefix, "--max-samples", 8, "--quiet", "--workers", 0, *extra))
        state = json.loads(prefix.with_name("train.progress.json").read_text())
        orders[name] = [rel for r in state["shards"] for rel in r["files"]]
    assert orders["sorted"] == sorted(expected)
    assert sorted(orders["seed0"]) == sorted(orders["seed1"]) == sorted(expected)
    assert len({tuple(o) for o in orders.values()}) == 3  # three different orders
    assert orders["seed0"] == packing_order(src, expected, 0) and orders["seed1"] == packing_order(src, expected, 1)

    # the same files created in another order (another directory listing): the same order, the same bytes
    copy = tmp_path / "copy"
    for rel in sorted((p.relative_to(src) for p in src.rglob("*") if p.is_file()), key=str, reverse=True):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, copy / rel)
    prefix = tmp_path / "copied" / "train"
    ok(run_tool(MAKE, copy, prefix, "--max-samples", 8, "--quiet", "--workers", 0))
    assert [f.read_bytes() for f in local_shards(prefix)] == [f.read_bytes() for f in local_shards(tmp_path / "seed0" / "train")]

    # a resume with another seed is refused: the recorded shards hold another order
    proc = run_tool(MAKE, src, tmp_path / "seed0" / "train", "--max-samples", 8, "--quiet", "--seed", 5)
    assert proc.returncode == 2 and "seed" in proc.stderr and "--restart" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "OUT"], "not found"),
    (["{src}", "OUT", "--shard-size", "12XB"], "--shard-size"),
    (["{src}", "OUT", "--shard-size", "0"], "--shard-size"),
    (["{src}", "OUT", "--max-samples", "-3"], "--max-samples"),
    (["{src}", "OUT", "--captions", "{missing}"], "not found"),
    (["{src}", "OUT", "--captions", "{badcsv}"], "'file' and 'caption'"),
    (["{src}", "{tmp}/"], "folder"),
])
def test_make_shards_bad_input_exit_2(dataset, tmp_path, argv, message):
    badcsv = tmp_path / "bad.csv"
    badcsv.write_text("path,text\na.jpg,hello\n")
    subs = {"{missing}": str(tmp_path / "nope"), "{src}": str(dataset[0]), "{badcsv}": str(badcsv),
            "OUT": str(tmp_path / "out" / "train"), "{tmp}/": str(tmp_path) + "/"}
    proc = run_tool(MAKE, *[subs.get(a, a) for a in argv])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.tar"))


def test_parse_size_units():
    ms = load_tool("make_shards")
    assert ms.parse_size("500MB") == 500_000_000
    assert ms.parse_size("1GB") == 10**9
    assert ms.parse_size("1.5gb") == 1_500_000_000
    assert ms.parse_size("2GiB") == 2 * 1024**3
    assert ms.parse_size("64k") == 64_000
    assert ms.parse_size("4096") == 4096
    for bad in ("", "GB", "-1MB", "0", "1 XB", "1e9"):
        with pytest.raises(Exception):
            ms.parse_size(bad)


# --------------------------------------------------------------------------- make_shards to S3

def test_make_shards_to_s3_resumes_and_matches_local(dataset, tmp_path, s3_endpoint):
    src, _ = dataset
    create_bucket(s3_endpoint, "shards")
    args = ("--max-samples", 8, "--resize", RESIZE, "--quiet")
    local = tmp_path / "train"
    ok(run_tool(MAKE, src, local, *args))
    reference = [f.read_bytes() for f in local_shards(local)]

    url = "s3://shards/t2i/train"
    ok(run_tool(MAKE, src, url, *args, "--endpoint-url", s3_endpoint, "--stop-after-shards", 3))
    assert list_keys(s3_endpoint, "shards") == ["t2i/train-000000.tar", "t2i/train-000001.tar",
                                                "t2i/train-000002.tar", "t2i/train.progress.json"]
    proc = ok(run_tool(MAKE, src, url, *args, "--endpoint-url", s3_endpoint))
    assert "resuming: 3 shards done" in proc.stderr
    assert f"data.shards: {url}-{{000000..000003}}.tar" in proc.stdout
    keys = list_keys(s3_endpoint, "shards", "t2i/train-")
    assert keys == [f"t2i/train-{i:06d}.tar" for i in range(4)]
    assert [get_object(s3_endpoint, "shards", k) for k in keys] == reference
    state = json.loads(get_object(s3_endpoint, "shards", "t2i/train.progress.json"))
    assert state["complete"] is True and sum(r["samples"] for r in state["shards"]) == 28

    # No such bucket: a clean error, not a traceback.
    proc = run_tool(MAKE, src, "s3://no-such-bucket/x/train", *args, "--endpoint-url", s3_endpoint)
    assert proc.returncode == 1 and "error" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- embed_captions

@pytest.fixture(scope="module")
def small_shards(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "train"
    ok(run_tool(MAKE, dataset[0], out, "--max-samples", 8, "--resize", RESIZE, "--quiet", "--no-shuffle"))  # shard 0: the short captions
    return out, local_shards(out)


def word_count(caption: str) -> int:
    return len(re.findall(r"[a-z0-9]+", caption.lower()))


def check_embedded(original: bytes, embedded: bytes, dim: int, max_tokens: int, dtype=np.float16) -> int:

    from pixeldiff.text import BuiltinTextEncoder

    enc = BuiltinTextEncoder(dim, max_tokens)
    before, after = samples_of(read_shard(original)), samples_of(read_shard(embedded))
    assert [k for k, _ in before] == [k for k, _ in after]
    for (key, old), (_, new) in zip(before, after):
        assert set(new) == set(old) | {"emb.npy", "mask.npy"}
        assert all(new[ext] == data for ext, data in old.items())  # other members unchanged
        emb = np.load(io.BytesIO(new["emb.npy"]), allow_pickle=False)
        mask = np.load(io.BytesIO(new["mask.npy"]), allow_pickle=False)
        caption = old["txt"].decode()
        n = min(word_count(caption), max_tokens)
        assert emb.shape == (n, dim) and emb.dtype == dtype  # trimmed to the real tokens on disk
        assert mask.shape == (n,) and mask.dtype == np.bool_ and mask.all()
        ref_emb, ref_mask = enc.encode([caption])
        np.testing.assert_array_equal(emb, ref_emb[0, :n].numpy().astype(dtype))
        assert not ref_mask[0, n:].any()  # what was trimmed was padding
    return len(after)


def test_embed_captions_builtin_local(small_shards, tmp_path):
    prefix, shards = small_shards
    out = tmp_path / "emb" / "train"
    pattern = f"{prefix}-{{000000..{len(shards) - 1:06d}}}.tar"
    proc = ok(run_tool(EMBED, pattern, "--out", out, "--dim", 16, "--max-tokens", 9, "--batch-size", 5))
    outs = local_shards(out)
    assert [f.name for f in outs] == [f.name for f in shards]
    words = []
    for src, dst in zip(shards, outs):
        check_embedded(src.read_bytes(), dst.read_bytes(), 16, 9)
        words += [word_count(m["txt"].decode()) for _, m in samples_of(read_shard(src.read_bytes()))]
    assert any(n > 9 for n in words) and any(n < 9 for n in words), "captions must exercise truncation and padding"
    assert "28 captions embedded in 4 shards" in proc.stdout
    assert "data.text: {encoder: precomputed, max_tokens: 9, dim: 16}" in proc.stdout
    assert f"data.shards: {out}-{{000000..000003}}.tar" in proc.stdout

    # Rerun: outputs exist, nothing is rewritten.
    mtimes = [f.stat().st_mtime_ns for f in outs]
    proc = ok(run_tool(EMBED, pattern, "--out", out, "--dim", 16, "--max-tokens", 9, "--quiet"))
    assert "4 shards done already" in proc.stdout
    assert [f.stat().st_mtime_ns for f in outs] == mtimes

    # In place (on a copy), float32, replacing the embeddings that are there.
    copy = tmp_path / "copy" / "train-000001.tar"
    copy.parent.mkdir()
    shutil.copy(outs[1], copy)
    ok(run_tool(EMBED, copy, "--in-place", "--force", "--dim", 8, "--max-tokens", 4, "--dtype", "float32",
                "--quiet"))
    assert check_embedded(shards[1].read_bytes(), copy.read_bytes(), 8, 4, np.float32) == 8
    assert not list(copy.parent.glob("*.partial"))
    proc = ok(run_tool(EMBED, copy, "--in-place", "--dim", 8, "--max-tokens", 4, "--quiet"))
    assert "1 shards done already" in proc.stdout


def test_embed_captions_s3_in_place(small_shards, s3_endpoint):
    prefix, shards = small_shards
    create_bucket(s3_endpoint, "embed")
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for f in shards[:2]:
        s3.upload_file(str(f), "embed", f"d/{f.name}")
    proc = ok(run_tool(EMBED, "s3://embed/d/train-{000000..000001}.tar", "--in-place", "--dim", 16,
                       "--max-tokens", 6, "--endpoint-url", s3_endpoint, "--quiet"))
    assert "16 captions embedded in 2 shards" in proc.stdout
    for f in shards[:2]:
        check_embedded(f.read_bytes(), get_object(s3_endpoint, "embed", f"d/{f.name}"), 16, 6)
    proc = ok(run_tool(EMBED, "s3://embed/d/train-000001.tar", "--out", "s3://embed/e/train", "--dim", 16,
                       "--max-tokens", 6, "--endpoint-url", s3_endpoint, "--quiet"))
    assert list_keys(s3_endpoint, "embed", "e/") == ["e/train-000001.tar"]
    proc = run_tool(EMBED, "s3://embed/d/train-000009.tar", "--out", "s3://embed/f/train", "--quiet",
                    "--endpoint-url", s3_endpoint)
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


FAKE_TRANSFORMERS = '''
import torch

LOADED = []


class _Tok:
    pad_token = "<pad>"
    eos_token = "</s>"
    unk_token = "<unk>"

    def __call__(self, captions, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        ids = torch.zeros(len(captions), max_length, dtype=torch.long)
        mask = torch.zeros(len(captions), max_length, dtype=torch.long)
        for i, c in enumerate(captions):
            words = c.split()[:max_length]
            ids[i, :len(words)] = torch.tensor([len(w) for w in words], dtype=torch.long)
            mask[i, :len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class AutoTokenizer:
    @staticmethod
    def from_pretrained(name, local_files_only=False):
        if name != "fake/encoder":
            raise OSError(f"{name} is not a local folder and no network in tests")
        return _Tok()


class _Out:
    def __init__(self, h):
        self.last_hidden_state = h


class _Config:
    is_encoder_decoder = True


class _Encoder(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        base = input_ids[..., None].float() * torch.arange(1, 13, dtype=torch.float32)
        return _Out(base * attention_mask[..., None] + 0.5)


class _Model(torch.nn.Module):
    config = _Config()

    def get_encoder(self):
        return _Encoder()

    def forward(self, **kw):
        raise AssertionError("the decoder must not be called")


class AutoModel:
    @staticmethod
    def from_pretrained(name, local_files_only=False, torch_dtype=None):
        return _Model()
'''


def test_embed_captions_hf_with_a_stand_in_transformers(small_shards, tmp_path):
    """The hf path end to end, with a local stand-in for the transformers package (no network)."""
    pkg = tmp_path / "fake" / "transformers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_TRANSFORMERS)
    env = {"PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    prefix, shards = small_shards
    out = tmp_path / "hf" / "train"
    L = 9
    proc = ok(run_tool(EMBED, shards[0], "--out", out, "--encoder", "hf:fake/encoder", "--max-tokens", L,
                       "--batch-size", 3, "--device", "cpu", "--quiet", env=env))
    assert f"data.text: {{encoder: precomputed, max_tokens: {L}, dim: 12}}" in proc.stdout
    lengths = []
    for (_, old), (_, new) in zip(samples_of(read_shard(shards[0].read_bytes())),
                                  samples_of(read_shard(local_shards(out)[0].read_bytes())), strict=True):
        words = old["txt"].decode().split()
        lengths.append(len(words))
        words = words[:L]
        emb = np.load(io.BytesIO(new["emb.npy"]))
        mask = np.load(io.BytesIO(new["mask.npy"]))
        assert emb.shape == (len(words), 12) and emb.dtype == np.float16  # trimmed: no padding on disk
        assert mask.tolist() == [True] * len(words)
        want = np.full((len(words), 12), 0.5, dtype=np.float32)
        for t, w in enumerate(words):
            want[t] += len(w) * np.arange(1, 13)
        np.testing.assert_array_equal(emb, want.astype(np.float16))
    assert min(lengths) < L < max(lengths), "captions must exercise padding and truncation"

    proc = run_tool(EMBED, shards[0], "--out", tmp_path / "hf2" / "train", "--encoder", "hf:fake/encoder",
                    "--dim", 7, "--max-tokens", 5, "--quiet", env=env)
    assert proc.returncode == 2 and "hidden size is 12" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_tool(EMBED, shards[0], "--out", tmp_path / "hf3" / "train", "--encoder", "hf:not/here",
                    "--quiet", env=env)
    assert proc.returncode == 2 and "cannot load" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "hf3").exists() or not list((tmp_path / "hf3").iterdir())


def test_embed_captions_hf_without_transformers_exit_2(small_shards, tmp_path):
    """Whether or not transformers is installed, a stand-in that fails to import gives the pip hint."""
    pkg = tmp_path / "broken" / "transformers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('No module named transformers (simulated)')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'broken'}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "o" / "train"
    proc = run_tool(EMBED, small_shards[1][0], "--out", out, "--encoder", "hf:google/t5-v1_1-small", env=env)
    assert proc.returncode == 2
    assert "pip install transformers" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not local_shards(out)


@pytest.mark.parametrize("argv, message", [
    (["{shard}"], "--out"),  # neither --out nor --in-place
    (["{shard}", "--out", "O", "--encoder", "nope"], "--encoder"),
    (["{shard}", "--out", "O", "--max-tokens", "0"], "--max-tokens"),
    (["{tmp}/none-{000..002}.tar", "--out", "O"], "not found"),
    (["{tmp}/x-{1..2.tar", "--out", "O"], "unbalanced braces"),  # {5..2} counts down, as braceexpand does
    (["{notatar}", "--out", "O"], "not a readable tar"),
])
def test_embed_captions_bad_input_exit_2(small_shards, tmp_path, argv, message):
    notatar = tmp_path / "junk-000000.tar"
    notatar.write_bytes(b"not a tar file" * 100)
    subs = {"{shard}": str(small_shards[1][0]), "O": str(tmp_path / "out" / "e"), "{notatar}": str(notatar)}
    args = [subs.get(a, a).replace("{tmp}", str(tmp_path)) for a in argv]
    proc = run_tool(EMBED, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_expand_braces():
    ec = load_tool("embed_captions")
    assert ec.expand_braces("s3://b/t-{000008..000011}.tar") == [f"s3://b/t-{i:06d}.tar" for i in range(8, 12)]
    assert ec.expand_braces("a{x,y}-{1..2}") == ["ax-1", "ax-2", "ay-1", "ay-2"]
    assert ec.expand_braces("plain.tar") == ["plain.tar"]
    assert ec.shards_pattern([f"p-{i:06d}.tar" for i in (3, 4, 5)]) == "p-{000003..000005}.tar"
