"""Evaluation inside a training run: at each stage's end and the run's end (and every eval.interval_steps), written
to eval.jsonl, counted in the ledger, goodput and the dashboard."""

import json

from conftest import run_cli
from launcher.summary import summary
from pixeldiff.ledger import read_jsonl

EVAL = {"samples": 16, "sampling_steps": 2, "cfg": 2.0, "batch": 8, "metrics": ["fid", "cmmd"],
        "without_weights": "random_features"}


def test_a_run_evaluates_at_each_stage_end_and_at_its_end(write_manifest, tmp_path):
    manifest = write_manifest(steps=(20, 10), eval={**EVAL, "interval_steps": 15})
    r = run_cli("launcher.cli", "run", str(manifest), "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "runs" / "tiny"
    recs = read_jsonl(run_dir / "eval.jsonl")
    assert [(e["step"], e["stage"], e["resolution"], e["why"]) for e in recs] == [
        (15, "16px", 16, "interval"), (20, "16px", 16, "stage_end"), (30, "32px", 32, "end")]
    for e in recs:
        assert e["samples"] == e["reference_samples"] == 16 and e["fid"] > 0 and e["cmmd"] is not None
        assert e["features"] == {"fid": "random-conv-seed0-256d", "cmmd": "random-conv-seed0-256d"}, e["features"]
        assert e["preprocess"]["uint8"].startswith("round") and e["seconds"] > 0
    assert "WARNING: eval" in r.stdout  # the substitute features are announced
    assert "eval at step 20 (16px, stage_end): fid" in r.stdout
    # reference statistics cached per resolution, reused by the interval and stage-end evaluations of 16 px
    assert len(list((run_dir / "eval").glob("reference-16px-*.pt"))) == 1
    assert len(list((run_dir / "eval").glob("reference-32px-*.pt"))) == 1
    ev = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["event"] == "evaluated"]
    assert [e["step"] for e in ev] == [15, 20, 30]
    s = summary(run_dir)
    assert s["goodput_breakdown"]["evaluation"] > 0
    assert s["eval"]["latest"]["step"] == 30 and [st for st, _ in s["eval"]["history"]["fid"]] == [15, 20, 30]
    status = run_cli("launcher.cli", "status", str(run_dir))
    assert "eval  step 30 (32px): fid" in status.stdout, status.stdout
    js = json.loads(run_cli("launcher.cli", "status", str(run_dir), "--json").stdout)
    assert js["eval"]["latest"]["fid"] == recs[-1]["fid"]
    # any kept checkpoint, afterwards: `pixeldiff-launch eval`
    r = run_cli("launcher.cli", "eval", str(run_dir), "--checkpoint", "step-00000020", "--samples", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    last = read_jsonl(run_dir / "eval.jsonl")[-1]
    assert (last["step"], last["stage"], last["resolution"], last["why"], last["checkpoint"], last["samples"]) == \
        (20, "16px", 16, "checkpoint", "step-00000020", 8), last
    assert json.loads(r.stdout.strip().splitlines()[-1])["fid"] == last["fid"]
    r = run_cli("launcher.cli", "eval", str(run_dir), "--checkpoint", "step-00000005")
    assert r.returncode == 2 and "no valid checkpoint step-00000005" in r.stderr and "step-00000030" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_without_weights_and_without_the_substitute_the_run_stops_before_training(write_manifest, tmp_path):
    manifest = write_manifest(eval={**EVAL, "without_weights": "error"})
    r = run_cli("launcher.cli", "run", str(manifest), "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "eval.inception.weights" in r.stderr and "tools/fetch_weights.py" in r.stderr, r.stderr
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()


def test_the_held_out_keys_are_never_trained_on_and_are_the_reference(tmp_path):
    """No eval.shards: a hash of each training key decides; the reader's epoch and the reference are complementary."""
    import itertools

    from launcher.manifest import load_manifest
    from pixeldiff.config import DataConfig, TextConfig
    from pixeldiff.evaluate import held_out, reference_batches, training_holdout
    from pixeldiff.shards import ShardSource
    from shardutil import write_shards

    keys = write_shards(tmp_path, n_shards=3, per_shard=20)
    shards = [str(p) for p in sorted(tmp_path.glob("train-*.tar"))]
    m = load_manifest(write_manifest_file(tmp_path, shards))
    holdout = training_holdout(m)
    assert holdout == (0.25, 0)
    src = ShardSource(DataConfig(source="webdataset", shards=shards, workers=0, shuffle_buffer=0), TextConfig(),
                      holdout=holdout)
    it = src.batches(16, 1)
    trained = {k for b in itertools.islice(it, 200) for k in b["key"]}  # several epochs: every trainable key
    it.close()
    reference = {c for _, caps, _ in reference_batches(m, 16, rank=0, world=1) for c in caps}
    expected = {k for k in keys if held_out(k, 0.25, 0)}
    assert 5 <= len(expected) <= 25 and trained == set(keys) - expected
    assert len(reference) == len(expected)  # one caption per held-out sample (shardutil: the caption names the key)
    assert all(any(k in c for k in expected) for c in reference)


def write_manifest_file(tmp_path, shards):
    import yaml

    from conftest import tiny_manifest_dict

    d = tiny_manifest_dict(data={"source": "webdataset", "shards": shards, "workers": 0, "text": {"max_tokens": 8, "dim": 16}},
                           eval={**EVAL, "samples": 100, "holdout": 0.25})
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(d))
    return path
