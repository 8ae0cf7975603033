"""No credential ever reaches what a run writes (issue 13, security).

Fake secrets go into the environment (AWS keys, a session token, a W&B key) and into an AWS profile file
(AWS_SHARED_CREDENTIALS_FILE, the manifest's data.s3.profile); a tiny run reads its shards from moto's S3 server
with them, locally and on the dev Slurm cluster; then every byte of every file the run wrote (run directory,
ledger, metrics, logs, the samples' text file, checkpoints, submitit's pickles and job script), what the CLI
printed and the dashboard's and `status --json`'s output are searched for each secret. A manifest that would carry
a credential itself (a password in an endpoint URL, a presigned URL, a secret in cluster.env) is refused, exit 2,
without repeating the secret.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_manifest_dict
from s3server import UNSET_ENV, create_bucket, s3_client
from shardutil import write_shards

REPO = Path(__file__).resolve().parents[1]

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAPIXELDIFFENV0001",
    "AWS_SECRET_ACCESS_KEY": "envSecretKey/pixeldiff+0001xyzzy",
    "AWS_SESSION_TOKEN": "envSessionToken-pixeldiff-0001-FwoGZXIvYXdzEJr",
    "WANDB_API_KEY": "wandbKey0pixeldiff0001deadbeefcafe",
}
PROFILE = {"aws_access_key_id": "AKIAPIXELDIFFPROFILE1",
           "aws_secret_access_key": "profileSecretKey/pixeldiff+0001plugh",
           "aws_session_token": "profileSessionToken-pixeldiff-0001"}
PASSWORD = "endpointPassw0rd-pixeldiff"  # in an endpoint URL: refused before anything is written


def all_secrets() -> dict[str, str]:
    return {**SECRETS, **{f"profile {k}": v for k, v in PROFILE.items()}, "endpoint password": PASSWORD}


def secret_env(tmp_path: Path) -> dict:
    """os.environ with the fake secrets and a profile file, as a user's login shell would have them."""
    creds = tmp_path / "aws-credentials"
    creds.write_text("[pixeldiff-test]\n" + "".join(f"{k} = {v}\n" for k, v in PROFILE.items()))
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV}
    env.update(SECRETS, AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_CONFIG_FILE=os.devnull,
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def leaks(texts: dict[str, bytes | str], roots: list[Path]) -> list[str]:
    """Where any secret occurs: in the given outputs, or in any file under `roots` (every byte, pickles too)."""
    found = []
    items = list(texts.items())
    for root in roots:
        items += [(str(p), p.read_bytes()) for p in sorted(Path(root).rglob("*")) if p.is_file()]
    for where, data in items:
        data = data.encode() if isinstance(data, str) else data
        found += [f"{name} in {where}" for name, value in all_secrets().items() if value.encode() in data]
    return found


def test_the_search_finds_an_environment_captured_in_a_pickle(tmp_path):
    """The search itself can fail: a pickled copy of the environment (what submitit would keep if the job
    function captured os.environ) is found."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "job.pkl").write_bytes(pickle.dumps(dict(secret_env(tmp_path))))
    found = leaks({}, [tmp_path / "d"])
    assert f"AWS_SECRET_ACCESS_KEY in {tmp_path / 'd' / 'job.pkl'}" in found and len(found) == len(SECRETS)
    assert leaks({"stdout": f"key={PROFILE['aws_secret_access_key']}"}, []) == [
        "profile aws_secret_access_key in stdout"]


def launch(args: list, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def shards_on_s3(endpoint: str, bucket: str, tmp_path: Path) -> str:
    write_shards(tmp_path / "shards", 2, 8)
    create_bucket(endpoint, bucket)
    client = s3_client(endpoint)
    for p in sorted((tmp_path / "shards").glob("*.tar")):
        client.upload_file(str(p), bucket, f"shards/{p.name}")
    return f"s3://{bucket}/shards/train-{{000..001}}.tar"


def s3_data(endpoint: str, shards: str) -> dict:
    return {"source": "webdataset", "shards": shards, "workers": 0, "shuffle_buffer": 0,
            "s3": {"endpoint_url": endpoint, "profile": "pixeldiff-test"}, "text": {"max_tokens": 8, "dim": 16}}


def outputs_of_status(run_dir: Path, env: dict, no_slurm: bool) -> dict[str, str]:
    flag = ["--no-slurm"] if no_slurm else []
    st = launch(["status", run_dir, "--json", *flag], env, timeout=120)
    watch = launch(["watch", run_dir, "--once", *flag], env, timeout=120)
    assert json.loads(st.stdout)["state"], st.stdout + st.stderr
    assert watch.stdout.strip(), watch.stderr
    return {"status --json": st.stdout + st.stderr, "watch --once": watch.stdout + watch.stderr}


def test_a_dry_run_reading_s3_with_secrets_writes_none_of_them(s3_endpoint, tmp_path):
    env = secret_env(tmp_path)
    shards = shards_on_s3(s3_endpoint, "secret-local", tmp_path)
    d = tiny_manifest_dict(name="secret-local", steps=(6, 2), data=s3_data(s3_endpoint, shards),
                           checkpoint={"interval_steps": 4, "keep": 2},
                           logging={"wandb": {"project": "secret-local", "mode": "offline"}, "sample_interval": 0})
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(d, sort_keys=False))
    runs = tmp_path / "runs"
    out = launch(["run", manifest, "--runs-dir", runs], env)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = runs / "secret-local"
    ends = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [e for e in ends if e["event"] == "segment_end"][-1]["reason"] == "finished"
    assert list((run_dir / "samples").glob("*.txt")) and list((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B ran, with the key in its environment
    texts = {"run's output": out.stdout + out.stderr, **outputs_of_status(run_dir, env, no_slurm=True)}
    assert leaks(texts, [run_dir]) == []


@pytest.mark.parametrize("override, where", [
    (f"data.s3.endpoint_url=http://minio:{PASSWORD}@127.0.0.1:9000", "data.s3.endpoint_url"),
    (f"checkpoint.dir=https://user:{PASSWORD}@store.example/ckpt", "checkpoint.dir"),
    (f"cluster.env.WANDB_API_KEY={PASSWORD}", "cluster.env.WANDB_API_KEY"),
    (f"cluster.env.AWS_SECRET_ACCESS_KEY={PASSWORD}", "cluster.env.AWS_SECRET_ACCESS_KEY"),
    (f"data.shards=https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=A%2F1&X-Amz-Signature={PASSWORD}",
     "data.shards"),
])
def test_a_credential_in_the_manifest_is_refused_without_repeating_it(tmp_path, override, where):
    runs = tmp_path / "runs"
    sets = ["--set", override] + (["--set", "data.source=webdataset"] if where == "data.shards" else [])
    out = launch(["run", REPO / "manifests" / "dryrun.yaml", "--runs-dir", runs, *sets], secret_env(tmp_path),
                 timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith(f"error: {where}: ") and "Traceback" not in out.stderr, out.stderr
    assert "credentials never go in the manifest" in out.stderr and "data.s3.profile" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    assert not runs.exists()  # nothing written


def test_a_dev_cluster_run_with_secrets_writes_none_of_them(slurm_cluster, s3_endpoint, tmp_path):
    """Slurm's sbatch hands the whole environment to the job (that is how the ranks get their credentials); the
    run directory, submitit's pickles and job script, every task's log and the dashboard must not keep them."""
    env = {**secret_env(tmp_path), **slurm_cluster.slurm_env}
    shards = shards_on_s3(s3_endpoint, "secret-slurm", tmp_path)
    runs = tmp_path / "runs"
    data = s3_data(s3_endpoint, shards)
    sets = ["name=secret-slurm", "cluster.nodes=1", "cluster.gpus_per_node=2", "cluster.cpus_per_task=1",
            "stages[0].global_batch=8", "stages[1].global_batch=8", "stages[0].steps=20", "stages[1].steps=10",
            "checkpoint.interval_steps=10", f"data={json.dumps({**data, 'text': {'max_tokens': 8, 'dim': 64}})}"]
    out = launch(["run", REPO / "manifests" / "devcluster.yaml", "--detach", "--runs-dir", runs,
                  *sum((["--set", s] for s in sets), [])], env, timeout=120)
    assert out.returncode == 0 and "submitted Slurm job" in out.stdout, out.stdout + out.stderr
    run_dir = runs / "secret-slurm"
    deadline, ev = time.time() + 300, []
    while time.time() < deadline:
        ev = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines() if line.strip()]
        if any(e["event"] in ("run_stopped",) or (e["event"] == "segment_end" and e["reason"] == "finished")
               for e in ev):
            break
        time.sleep(3)
    logs = sorted((run_dir / "jobs").rglob("*_log.out"))
    tail = "\n".join(p.read_text(errors="replace")[-1500:] for p in logs[-2:])
    assert [e for e in ev if e["event"] == "segment_end"][-1:] and ev[-1]["event"] != "run_stopped", tail
    assert [e for e in ev if e["event"] == "segment_end"][-1]["reason"] == "finished", tail
    time.sleep(5)  # the supervisor's last lines and submitit's result pickle
    pickles = sorted((run_dir / "jobs").rglob("*.pkl"))
    assert any(p.name.endswith("_submitted.pkl") for p in pickles), sorted((run_dir / "jobs").rglob("*"))
    assert list((run_dir / "jobs").rglob("*_submission.sh")) and logs
    texts = {"run's output": out.stdout + out.stderr, **outputs_of_status(run_dir, env, no_slurm=False)}
    assert leaks(texts, [run_dir]) == []
