"""A real S3 endpoint for tests: moto's server on 127.0.0.1, no network, no AWS account.

    from s3server import create_bucket   # the s3_endpoint fixture is registered in conftest.py

    def test_upload(s3_endpoint):
        create_bucket(s3_endpoint, "my-bucket")
        ...  # s3://my-bucket/... with endpoint_url=s3_endpoint

`start_moto()` starts one server and returns (endpoint_url, stop). The session-scoped
`s3_endpoint` fixture starts one for the test session, sets dummy credentials
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY=testing, AWS_DEFAULT_REGION=us-east-1) in
os.environ so that subprocesses inherit them, and undoes both at the end. The tests that
use it fail (never skip) when moto's server, boto3 or s3fs is missing: `pip install -e '.[test]'`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never pick up a real profile, token or config from the machine running the tests.
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
UNSET_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(timeout: float = 30.0, port: int | None = None) -> tuple[str, callable]:
    """Start `python -m moto.server` on `port` (default: a free one) of 127.0.0.1; -> (endpoint_url, stop)."""
    port = port or _free_port()
    log = tempfile.TemporaryFile()
    env = {**os.environ, **DUMMY_ENV}
    for name in UNSET_ENV:
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            out = log.read().decode(errors="replace")[-2000:]
            stop()
            raise RuntimeError(f"moto server exited with status {proc.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(url + "/", timeout=1):
                break
        except urllib.error.HTTPError:  # any HTTP answer means it is serving
            break
        except OSError:
            if time.monotonic() > deadline:
                stop()
                raise RuntimeError(f"moto server did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.1)
    return url, stop


def s3_client(endpoint_url: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def create_bucket(endpoint_url: str, name: str) -> None:
    s3_client(endpoint_url).create_bucket(Bucket=name)


def get_object(endpoint_url: str, bucket: str, key: str) -> bytes:
    return s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()


def list_keys(endpoint_url: str, bucket: str, prefix: str = "") -> list[str]:
    pages = s3_client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_endpoint():
    """The URL of a moto S3 server shared by the session; dummy credentials in os.environ meanwhile."""
    # no skip: the test extra installs these, and a missing one must fail loudly in CI
    import boto3  # noqa: F401
    import moto.server  # noqa: F401
    import s3fs  # noqa: F401

    saved = {name: os.environ.get(name) for name in (*DUMMY_ENV, *UNSET_ENV)}
    os.environ.update(DUMMY_ENV)
    for name in UNSET_ENV:
        os.environ.pop(name, None)
    url, stop = start_moto()
    try:
        yield url
    finally:
        stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class TcpProxy:
    """A loopback TCP forwarder in front of a server, to take the server 'off the network' and back.

    `down()` closes the listening socket and every open connection (clients see resets and
    refused connections); `up()` listens again on the same port. The server keeps its state.
    """

    def __init__(self, target_port: int):
        import threading

        self.target_port, self.port = target_port, _free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> "TcpProxy":
        import threading

        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, ls: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
