"""A real Slurm cluster on 127.0.0.1: slurmctld, slurmdbd (with its own MariaDB) and 4 slurmd, 8 fake GPUs each.

    python -m slurm.dev.cluster start  [--base DIR] [--port-base N]   # install if missing (root), start, wait idle
    python -m slurm.dev.cluster status [--base DIR]                   # daemons alive? + sinfo
    python -m slurm.dev.cluster env    [--base DIR]                   # `export SLURM_CONF=...` for a shell
    python -m slurm.dev.cluster stop   [--base DIR]                   # cancel jobs, stop daemons by recorded PID

From Python (tests): `DevCluster(base).start()` returns the environment clients need ({"SLURM_CONF": ...}).

Everything lives under BASE (default $PIXELDIFF_SLURM_DEV or /tmp/pixeldiff-slurm): etc/ (configs),
dev/gpu0..7 (character devices: Slurm rejects plain files as GRES), log/, pids/, state/ (slurmctld),
spool/<node>/, mysql/ (MariaDB datadir). The state and the database survive stop/start, so job ids keep
counting up within one BASE; a fresh BASE starts again at job id 1.
The verified facts behind each config line are in /work/shared/SLURM-DEV-FACTS.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE = "/tmp/pixeldiff-slurm"
DEFAULT_PORT_BASE = 16800  # override with --port-base or $PIXELDIFF_SLURM_PORT_BASE
NODES = ("node1", "node2", "node3", "node4")
GPUS_PER_NODE = 8
CPUS_PER_NODE = 8
PARTITION = "dev"
CLUSTER_NAME = "pixeldiff-dev"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
PROGRAMS = ("slurmctld", "slurmd", "slurmdbd", "sinfo", "squeue", "sacct", "sbatch", "scontrol", "munged", "munge",
            "unmunge", "mariadbd", "mariadb-install-db")
CLIENT_TIMEOUT_S = 10


class DevClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ports:
    """Every TCP port the cluster listens on, derived from one base so a single number moves them all."""

    base: int

    @property
    def mysql(self) -> int:
        return self.base + 6

    @property
    def slurmctld(self) -> int:
        return self.base + 17

    @property
    def slurmdbd(self) -> int:
        return self.base + 19

    def slurmd(self, index: int) -> int:  # index 0..3
        return self.base + 21 + index

    def all(self) -> dict[str, int]:
        ports = {"mariadb": self.mysql, "slurmctld": self.slurmctld, "slurmdbd": self.slurmdbd}
        ports.update({f"slurmd-{n}": self.slurmd(i) for i, n in enumerate(NODES)})
        return ports


def default_base() -> Path:
    return Path(os.environ.get("PIXELDIFF_SLURM_DEV") or DEFAULT_BASE)


def default_port_base() -> int:
    return int(os.environ.get("PIXELDIFF_SLURM_PORT_BASE") or DEFAULT_PORT_BASE)


# ---------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (state Z, exited but not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child (tests start daemons in-process): don't leave a zombie
    except ChildProcessError:
        pass


def stop_pid(pid: int, wait_s: float = 10.0) -> None:
    """SIGTERM, wait up to `wait_s`, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid):
                break
            time.sleep(0.1)
    _reap(pid)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(what: str, check, timeout: float, log: Path | None = None, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = ""
            if log is not None and log.exists():
                last = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                tail = f"\n--- last lines of {log} ---\n{last}"
            raise DevClusterError(f"{what} not ready within {timeout:.0f} s{tail}")
        time.sleep(interval)


# ---------------------------------------------------------------- the cluster


class DevCluster:
    def __init__(self, base: str | Path | None = None, port_base: int | None = None, max_time_min: int = 10):
        self.base = Path(base or default_base()).resolve()
        self.ports = Ports(port_base if port_base is not None else default_port_base())
        self.max_time_min = max_time_min
        self.etc, self.log, self.pids = self.base / "etc", self.base / "log", self.base / "pids"
        self.conf = self.etc / "slurm.conf"
        self.munge_socket = self.base / "run" / "munge.socket"

    # -- what clients need

    def env(self) -> dict[str, str]:
        """Variables a Slurm client (sbatch, squeue, submitit, slurm.commands.Slurm) needs for this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env()}

    # -- state

    def daemons(self) -> dict[str, int]:
        """name -> recorded PID."""
        out = {}
        if self.pids.is_dir():
            for f in sorted(self.pids.iterdir()):
                try:
                    out[f.name] = int(f.read_text().strip())
                except (OSError, ValueError):
                    pass
        return out

    def alive(self) -> dict[str, bool]:
        return {name: pid_alive(pid) for name, pid in self.daemons().items()}

    def expected_daemons(self) -> list[str]:
        return ["munged", "mariadb", "slurmdbd", "slurmctld", *[f"slurmd-{n}" for n in NODES]]

    def is_running(self) -> bool:
        alive = self.alive()
        return all(alive.get(name) for name in self.expected_daemons())

    # -- start / stop

    def start(self, timeout: float = 90.0, quiet: bool = True) -> dict[str, str]:
        """Start every daemon (or reuse a running cluster) and wait until all nodes are idle. -> self.env()."""
        if self.is_running():
            if not quiet:
                print(f"already running: {self.base}")
            self.wait_ready(timeout=timeout)  # nodes may be busy with jobs: responding is enough
            return self.env()
        if any(self.alive().values()):  # half a cluster (a daemon died): restart it whole
            self.stop(quiet=quiet)
        ensure_installed()
        self._check_ports_free()
        self._write_files()
        deadline = time.monotonic() + timeout
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        try:
            self._start_munge(left())
            self._start_mariadb(left())
            self._spawn("slurmdbd", ["slurmdbd", "-D"])
            wait_for(f"slurmdbd on port {self.ports.slurmdbd}", lambda: port_open(self.ports.slurmdbd), left(),
                     self.log / "slurmdbd.log")
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            wait_for(f"slurmctld on port {self.ports.slurmctld}", lambda: port_open(self.ports.slurmctld), left(),
                     self.log / "slurmctld.log")
            for node in NODES:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self.wait_idle(timeout=left())
        except BaseException:
            self.stop(quiet=True)
            raise
        if not quiet:
            print(f"started: {len(NODES)} nodes x {GPUS_PER_NODE} GPUs in partition {PARTITION!r} ({self.base})")
        return self.env()

    def stop(self, quiet: bool = True) -> None:
        """Cancel all jobs, then stop the daemons by recorded PID (slurmd, slurmctld, slurmdbd, mariadb, munged)."""
        alive = self.alive()
        if alive.get("slurmctld"):
            self._client(["scancel", "--full", "--partition", PARTITION], check=False)
            self._wait_no_jobs(timeout=15)
        order = [*[f"slurmd-{n}" for n in NODES], "slurmctld", "slurmdbd", "mariadb", "munged"]
        names = order + [n for n in self.daemons() if n not in order]
        pids = self.daemons()
        for name in names:
            if name in pids:
                # a slurmd that cannot reach slurmctld ignores SIGTERM: short wait, then SIGKILL
                stop_pid(pids[name], wait_s=3.0 if name.startswith("slurmd-") else 15.0)
                (self.pids / name).unlink(missing_ok=True)
        self._kill_stray_steps()
        if not quiet:
            print(f"stopped ({self.base})" if any(alive.values()) else f"not running ({self.base})")

    def wait_idle(self, timeout: float = 60.0) -> None:
        def all_idle() -> bool:
            states = self.node_states()
            return len(states) == len(NODES) and all(s == "idle" for s in states.values())

        wait_for(f"{len(NODES)} idle nodes in sinfo", all_idle, timeout, self.log / "slurmctld.log", interval=0.3)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every node registered and responding (idle, or running jobs)."""
        def all_up() -> bool:
            states = self.node_states()
            return len(states) == len(NODES) and all(s in ("idle", "mix", "alloc", "comp") for s in states.values())

        wait_for(f"{len(NODES)} responding nodes in sinfo", all_up, timeout, self.log / "slurmctld.log", interval=0.3)

    def node_states(self) -> dict[str, str]:
        r = self._client(["sinfo", "--noheader", "--Node", "--format=%N %t"], check=False)
        if r is None or r.returncode != 0:
            return {}
        return dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)

    def status(self) -> str:
        lines = [f"base: {self.base}", f"SLURM_CONF={self.conf}"]
        pids = self.daemons()
        for name in sorted(set(self.expected_daemons()) | set(pids)):
            pid = pids.get(name)
            state = "alive" if pid and pid_alive(pid) else "dead" if pid else "not started"
            lines.append(f"  {name:<14} {state}" + (f" (pid {pid})" if pid else ""))
        if self.alive().get("slurmctld"):
            r = self._client(["sinfo"], check=False)
            lines.append(r.stdout.rstrip() if r is not None and r.returncode == 0 else
                         f"sinfo failed: {r.stderr.strip() if r is not None else 'timed out'}")
        return "\n".join(lines)

    # -- internals

    def _client(self, argv: list[str], check: bool = True, timeout: float = CLIENT_TIMEOUT_S):
        try:
            r = subprocess.run(argv, env=self.client_env(), capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            if check:
                raise DevClusterError(f"{argv[0]} did not answer within {timeout} s (SLURM_CONF={self.conf})")
            return None
        if check and r.returncode != 0:
            raise DevClusterError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def _wait_no_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self._client(["squeue", "--noheader", "--format=%i"], check=False)
            if r is None or r.returncode != 0 or not r.stdout.strip():
                return
            time.sleep(0.5)

    def _kill_stray_steps(self) -> None:
        """slurmstepd daemonizes, so stopping slurmd leaves running jobs behind: find them by the marker
        variable every slurmd of this BASE passes down, and kill them with their process groups."""
        marker = f"PIXELDIFF_SLURM_DEV_BASE={self.base}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if marker not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
            except OSError:
                continue
            pid = int(proc.name)
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _check_ports_free(self) -> None:
        busy = {name: port for name, port in self.ports.all().items() if port_open(port)}
        if busy:
            raise DevClusterError(
                f"ports already in use: {busy}. Another dev cluster (another --base) or another service holds "
                f"them: stop it, or pick other ports with --port-base N / PIXELDIFF_SLURM_PORT_BASE=N "
                f"(now {self.ports.base})")

    def _spawn(self, name: str, argv: list[str], user: str | None = None, env: dict | None = None) -> int:
        """Start a daemon in its own session (like nohup), stdin /dev/null, output to log/<name>.out; record its PID."""
        self.pids.mkdir(parents=True, exist_ok=True)
        out = open(self.log / f"{name}.out", "ab")
        full_env = {**os.environ, **self.env(), "PIXELDIFF_SLURM_DEV_BASE": str(self.base), **(env or {})}
        kw = {"user": user, "group": user} if user else {}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=full_env, start_new_session=True, cwd=self.base, **kw)
        finally:
            out.close()
        (self.pids / name).write_text(f"{proc.pid}\n")
        time.sleep(0.05)
        if proc.poll() is not None:
            log = self.log / f"{name}.out"
            raise DevClusterError(f"{name} exited at once with status {proc.returncode}; see {log}:\n"
                                  + log.read_text(errors="replace")[-2000:])
        return proc.pid

    def _start_munge(self, timeout: float) -> None:
        """This cluster's own munged (own key and socket under BASE): stopping it never breaks another cluster
        or the machine's munge, and nothing needs /etc/munge or /run/munge."""
        key = self.etc / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self.munge_socket.unlink(missing_ok=True)
        run = self.base / "run"
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={run / 'munged.pid'}", f"--seed-file={run / 'munged.seed'}",
                               f"--log-file={self.log / 'munged.log'}"])
        wait_for("munged", lambda: _munge_works(self.munge_socket), timeout, self.log / "munged.out")

    def _start_mariadb(self, timeout: float) -> None:
        datadir = self.base / "mysql"
        sock = self.base / "run" / "mysqld.sock"
        fresh = not (datadir / ".pixeldiff-initialized").exists()
        if fresh:
            shutil.rmtree(datadir, ignore_errors=True)
            datadir.mkdir(parents=True)
            r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                                "--skip-test-db", "--auth-root-authentication-method=socket"],
                               capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise DevClusterError(f"mariadb-install-db failed ({r.returncode}):\n"
                                      f"{r.stdout[-1500:]}{r.stderr[-1500:]}")
        self._spawn("mariadb", ["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
                                f"--port={self.ports.mysql}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                                "--user=root", f"--pid-file={self.base / 'run' / 'mariadb.pid'}",
                                f"--log-error={self.log / 'mariadb.log'}", "--innodb-buffer-pool-size=64M"])
        wait_for(f"mariadb on port {self.ports.mysql}", lambda: port_open(self.ports.mysql) and sock.exists(), timeout,
                 self.log / "mariadb.log")
        if fresh:
            password = (self.etc / "db-password").read_text().strip()
            sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
                   "GRANT ALL ON *.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
            r = subprocess.run(["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root", "-e", sql],
                               capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise DevClusterError(f"creating the slurm database user failed: {r.stderr.strip()}")
            (datadir / ".pixeldiff-initialized").write_text("")

    def _write_files(self) -> None:
        for d in ("etc", "log", "pids", "run", "state", "dev", *[f"spool/{n}" for n in NODES]):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        for i in range(GPUS_PER_NODE):
            gpu = self.base / "dev" / f"gpu{i}"
            if not gpu.is_char_device():
                gpu.unlink(missing_ok=True)
                os.mknod(gpu, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
        pw = self.etc / "db-password"
        if not pw.exists():
            pw.write_text(secrets.token_hex(16) + "\n")
            pw.chmod(0o600)
        self.conf.write_text(slurm_conf(self.base, self.ports, self.max_time_min))
        (self.etc / "gres.conf").write_text(gres_conf(self.base))
        dbd = self.etc / "slurmdbd.conf"
        dbd.touch(mode=0o600)
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it holds the DB password)
        dbd.write_text(slurmdbd_conf(self.base, self.ports, pw.read_text().strip()))


def _munge_works(sock: Path) -> bool:
    try:
        enc = subprocess.run(["munge", "-S", str(sock), "-n"], capture_output=True, timeout=5, stdin=subprocess.DEVNULL)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge", "-S", str(sock)], input=enc.stdout, capture_output=True, timeout=5)
        return dec.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def ensure_installed() -> None:
    """apt-get install the Debian packages when run as root; otherwise say exactly what is missing."""
    if not missing_programs():
        return
    if os.geteuid() != 0:
        raise DevClusterError(
            f"Slurm dev cluster needs {', '.join(missing_programs())}, which are not installed, and installing needs "
            f"root: sudo apt-get install -y --no-install-recommends {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],):
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        if r.returncode != 0:  # stale package lists on a fresh machine: update once and retry
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise DevClusterError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    if missing_programs():
        raise DevClusterError(f"still missing after apt-get install: {', '.join(missing_programs())}")


# ---------------------------------------------------------------- config text


def slurm_conf(base: Path, ports: Ports, max_time_min: int) -> str:
    return f"""\
# written by slurm.dev.cluster: a dev cluster on 127.0.0.1 (see /work/shared/SLURM-DEV-FACTS.md)
ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports.slurmctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={base}/run/munge.socket,cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/spool/%n/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=5
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports.slurmdbd}
AccountingStorageTRES=gres/gpu
# the munge socket for talking to slurmdbd (AuthInfo's socket= does not cover that connection)
AccountingStoragePass={base}/run/munge.socket
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
NodeName=node[1-4] NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports.slurmd(0)}-{ports.slurmd(3)} \
CPUs={CPUS_PER_NODE} RealMemory=4000 Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN
PartitionName={PARTITION} Nodes=node[1-4] Default=YES MaxTime={max_time_min} State=UP
"""


def gres_conf(base: Path) -> str:
    return f"AutoDetect=off\nNodeName=node[1-4] Name=gpu File={base}/dev/gpu[0-{GPUS_PER_NODE - 1}]\n"


def slurmdbd_conf(base: Path, ports: Ports, password: str) -> str:
    return f"""\
AuthType=auth/munge
AuthInfo=socket={base}/run/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports.slurmdbd}
SlurmUser=root
LogFile={base}/log/slurmdbd.log
PidFile={base}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports.mysql}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
"""


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm.dev.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["start", "stop", "status", "env"])
    p.add_argument("--base", default=None, help=f"state directory (default $PIXELDIFF_SLURM_DEV or {DEFAULT_BASE})")
    p.add_argument("--port-base", type=int, default=None,
                   help=f"first of the ports used (default $PIXELDIFF_SLURM_PORT_BASE or {DEFAULT_PORT_BASE}): "
                        "+6 mariadb, +17 slurmctld, +19 slurmdbd, +21..+24 slurmd")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for idle nodes on start")
    args = p.parse_args(argv)
    cluster = DevCluster(args.base, args.port_base)
    try:
        if args.command == "start":
            cluster.start(timeout=args.timeout, quiet=False)
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.command == "stop":
            cluster.stop(quiet=False)
        elif args.command == "status":
            print(cluster.status())
            return 0 if cluster.is_running() else 3
        elif args.command == "env":
            print(f"export SLURM_CONF={cluster.conf}")
    except DevClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
