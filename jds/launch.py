"""``jds launch``: start the processes of a multi-process jds job and watch them.

jds runs JAX's multi-controller runtime: one process per host drives every local accelerator
of that host, and the processes meet at process 0's coordinator. ``jds launch`` starts those
processes and gives each the variables ``jds.distributed.init_distributed`` reads:

- ``JDS_COORDINATOR`` (``host:port``), ``JDS_NUM_PROCESSES``, ``JDS_PROCESS_ID``;
- ``JDS_LOCAL_DEVICE_COUNT``: the local devices a process expects (hostfile ``slots``,
  ``--cpu-devices`` or ``--devices-per-proc``), for a start-up check;
- ``JDS_LOCAL_DEVICE_IDS`` (``--devices-per-proc``: process i drives devices i*K .. i*K+K-1);
- ``JDS_INIT_TIMEOUT`` / ``JDS_FAILURE_TIMEOUT`` (seconds) when ``--init-timeout`` /
  ``--failure-timeout`` are given;
- with ``--cpu-devices M``: ``JAX_PLATFORMS=cpu``, ``JDS_CPU_COLLECTIVES=gloo`` and
  ``--xla_force_host_platform_device_count=M`` in ``XLA_FLAGS`` (other flags kept), so M
  simulated CPU devices per process, joined across processes by gloo.

Two modes:

- **local** (``--nproc N``): N processes on this machine, coordinator ``127.0.0.1`` on a free
  port. A command ending in ``.py`` or starting with ``-m`` / ``-c`` runs under this Python.
- **hostfile** (``--hostfile FILE``, DeepSpeed's format: ``host slots=N`` lines, ``#``
  comments): one process per host over ``ssh -tt host 'cd CWD && exec env VARS CMD'`` (or
  one ``pdsh -w host`` per host); the coordinator is the first host, port 29500 by default.
  ``-tt`` gives the remote command a terminal so that it gets SIGHUP when its ssh ends.
  ``JAX_*``, ``XLA_*``, ``NCCL_*`` and ``JDS_*`` variables of the launching shell and every
  ``--env KEY=VALUE`` are passed on. ``--dry-run`` prints the commands instead. Hosts are
  assumed to share this machine's paths (working directory, and this Python for ``x.py``
  commands, as DeepSpeed assumes); ``--chdir`` or a command like ``python3 x.py`` changes that.

Every line a process writes is prefixed with ``[rank i] ``. Failures end the whole job: when
a process exits with a non-zero code or by a signal, the launcher names it on stderr, sends
SIGTERM to the other processes (to their process groups), SIGKILL after ``--failure-timeout``
seconds (30), and returns the first failure's code (128 + signal number for a signal).
SIGINT / SIGTERM sent to the launcher are forwarded the same way (a second one kills at
once). Children are in their own sessions and get SIGTERM if the launcher itself dies.

Clusters with their own launcher need no ``jds launch``; ``init_distributed`` detects them:

- Slurm: ``srun`` starts one task per node (``--ntasks-per-node=1``) and JAX reads
  ``SLURM_*``; see ``scripts/launch/slurm_gpu.sbatch``.
- Cloud TPU pods: ``gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command
  '...'`` runs the command on every worker and JAX finds the pod by itself; see
  ``scripts/launch/tpu_pod.sh``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

DEFAULT_FAILURE_TIMEOUT = 30
"""Seconds between SIGTERM and SIGKILL when the launcher stops the processes."""

DEFAULT_HOSTFILE_PORT = 29500
"""Coordinator port in hostfile mode (DeepSpeed's default master port)."""

FORWARDED_PREFIXES = ("JAX_", "XLA_", "NCCL_", "JDS_")
"""Variables of the launching shell that hostfile mode passes on to every host."""

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_HOST_RE = re.compile(r"^(?P<host>[^\s=#]+)(?:\s+slots\s*=\s*(?P<slots>\S+))?$")


@dataclass(frozen=True)
class Host:
    """One hostfile entry: ``name``, the expected local device count ``slots`` (None when the
    line gives none) and the ``line`` number it came from."""

    name: str
    slots: int | None
    line: int


@dataclass(frozen=True)
class Worker:
    """One process to start: ``argv`` run locally with ``env`` (None: the launcher's own);
    ``label`` names it in messages; ``shown`` is the command ``--dry-run`` prints;
    ``coordinator`` is the job's ``host:port``."""

    rank: int
    argv: list[str]
    env: dict[str, str] | None
    label: str
    shown: str
    coordinator: str


# ---------------------------------------------------------------------------------------------
# Building the commands


def parse_hostfile(path: str | os.PathLike) -> list[Host]:
    """Read a DeepSpeed hostfile: ``host slots=N`` per line, ``#`` comments, blank lines.

    Args:
      path: the hostfile.

    Returns:
      The hosts in file order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a malformed line, a repeated host or an empty file (the message names the
        file and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hostfile {path} does not exist (--hostfile)")
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        m = _HOST_RE.match(text)
        slots = m and m["slots"]
        if not m or (slots is not None and not (slots.isdigit() and int(slots) > 0)):
            raise ValueError(
                f"hostfile {path}, line {number}: {raw.strip()!r} is not 'HOST slots=N' "
                "(N a positive integer: the accelerators of that host)"
            )
        name = m["host"]
        if name in seen:
            raise ValueError(f"hostfile {path}, line {number}: host {name!r} is already listed "
                             f"on line {seen[name]}; jds runs one process per host, list each "
                             "host once")
        seen[name] = number
        hosts.append(Host(name, int(slots) if slots else None, number))
    if not hosts:
        raise ValueError(f"hostfile {path} lists no hosts (expected lines 'HOST slots=N')")
    return hosts


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (for a local coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str | None, count: int) -> str:
    """``xla_flags`` with ``--xla_force_host_platform_device_count=count``, replacing any
    earlier value of that flag and keeping the other flags."""
    kept = [f for f in (xla_flags or "").split()
            if f != _DEVICE_COUNT_FLAG and not f.startswith(_DEVICE_COUNT_FLAG + "=")]
    return " ".join([*kept, f"{_DEVICE_COUNT_FLAG}={count}"])


def resolve_command(cmd: Sequence[str], python: str = sys.executable) -> list[str]:
    """The argv for the user's command: ``x.py ...``, ``-m mod ...`` and ``-c CODE ...`` run
    under ``python``; anything else (``jds``, ``python3``, a binary) runs as it is."""
    cmd = list(cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ValueError("no command to launch: put it after '--', e.g. "
                         "jds launch --nproc 2 -- train.py --steps 10")
    if cmd[0] in ("-m", "-c") or cmd[0].endswith(".py"):
        return [python, *cmd]
    return cmd


def process_env(
    *,
    coordinator: str,
    num_processes: int,
    process_id: int,
    local_device_count: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    cpu_devices: int | None = None,
    xla_flags: str | None = None,
    init_timeout: int | None = None,
    failure_timeout: int | None = None,
) -> dict[str, str]:
    """The variables one process gets (only those ``jds launch`` sets).

    Args:
      coordinator: ``host:port`` of process 0's coordinator.
      num_processes: processes in the job.
      process_id: this process's id.
      local_device_count: devices this process expects (``JDS_LOCAL_DEVICE_COUNT``).
      local_device_ids: devices this process drives (``JDS_LOCAL_DEVICE_IDS``).
      cpu_devices: simulated CPU devices per process (sets the CPU variables).
      xla_flags: the ``XLA_FLAGS`` to extend when ``cpu_devices`` is given.
      init_timeout: ``JDS_INIT_TIMEOUT`` seconds, when given.
      failure_timeout: ``JDS_FAILURE_TIMEOUT`` seconds, when given.

    Returns:
      ``{name: value}``.
    """
    env = {
        "JDS_COORDINATOR": coordinator,
        "JDS_NUM_PROCESSES": str(num_processes),
        "JDS_PROCESS_ID": str(process_id),
        "PYTHONUNBUFFERED": "1",  # lines reach the launcher as they are written
    }
    if cpu_devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = with_device_count(xla_flags, cpu_devices)
        env["JDS_CPU_COLLECTIVES"] = "gloo"
        local_device_count = local_device_count or cpu_devices
    if local_device_ids is not None:
        env["JDS_LOCAL_DEVICE_IDS"] = ",".join(str(i) for i in local_device_ids)
    if local_device_count is not None:
        env["JDS_LOCAL_DEVICE_COUNT"] = str(local_device_count)
    if init_timeout is not None:
        env["JDS_INIT_TIMEOUT"] = str(init_timeout)
    if failure_timeout is not None:
        env["JDS_FAILURE_TIMEOUT"] = str(failure_timeout)
    return env


def local_workers(
    cmd: Sequence[str],
    nproc: int,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    cpu_devices: int | None = None,
    devices_per_proc: int | None = None,
    init_timeout: int | None = None,
    failure_timeout: int | None = None,
    base_env: Mapping[str, str] | None = None,
) -> list[Worker]:
    """``nproc`` processes of ``cmd`` on this machine (``jds launch --nproc``)."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: need at least one process")
    if cpu_devices is not None and cpu_devices < 1:
        raise ValueError(f"--cpu-devices {cpu_devices}: need at least one device per process")
    if devices_per_proc is not None and devices_per_proc < 1:
        raise ValueError(f"--devices-per-proc {devices_per_proc}: need at least one device")
    if cpu_devices is not None and devices_per_proc is not None:
        raise ValueError("--cpu-devices and --devices-per-proc exclude each other: the first "
                         "simulates CPU devices, the second splits this machine's GPUs")
    base = dict(os.environ if base_env is None else base_env)
    argv = resolve_command(cmd)
    coordinator = f"{master_addr}:{master_port or free_port()}"
    workers = []
    for rank in range(nproc):
        ids = (range(rank * devices_per_proc, (rank + 1) * devices_per_proc)
               if devices_per_proc else None)
        delta = process_env(
            coordinator=coordinator, num_processes=nproc, process_id=rank,
            local_device_ids=ids, local_device_count=devices_per_proc,
            cpu_devices=cpu_devices, xla_flags=base.get("XLA_FLAGS"),
            init_timeout=init_timeout, failure_timeout=failure_timeout)
        shown = shlex.join(["env", *(f"{k}={v}" for k, v in delta.items()), *argv])
        workers.append(Worker(rank, argv, {**base, **delta}, f"process {rank}", shown,
                              coordinator))
    return workers


def remote_command(cwd: str, env: Mapping[str, str], argv: Sequence[str]) -> str:
    """The shell line run on a host: ``cd CWD && exec env K=V ... ARGV`` (shlex-quoted)."""
    assignments = [f"{k}={v}" for k, v in env.items()]
    return f"cd {shlex.quote(cwd)} && exec " + shlex.join(["env", *assignments, *argv])


def hostfile_workers(
    cmd: Sequence[str],
    hosts: Sequence[Host],
    *,
    master_addr: str | None = None,
    master_port: int | None = None,
    launcher: str = "ssh",
    ssh_port: int | None = None,
    cwd: str | None = None,
    cpu_devices: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    init_timeout: int | None = None,
    failure_timeout: int | None = None,
    base_env: Mapping[str, str] | None = None,
) -> list[Worker]:
    """One process per host over ssh or pdsh (``jds launch --hostfile``).

    The remote environment is the forwarded variables of ``base_env`` (``FORWARDED_PREFIXES``),
    then ``extra_env``, then the job's own variables (``process_env``).
    """
    if launcher not in ("ssh", "pdsh"):
        raise ValueError(f"--launcher {launcher!r}: choose ssh or pdsh")
    base = dict(os.environ if base_env is None else base_env)
    argv = resolve_command(cmd)
    coordinator = f"{master_addr or hosts[0].name}:{master_port or DEFAULT_HOSTFILE_PORT}"
    cwd = cwd or os.getcwd()
    forwarded = {k: v for k, v in sorted(base.items()) if k.startswith(FORWARDED_PREFIXES)}
    local_env = dict(base)
    if launcher == "pdsh" and ssh_port is not None:
        local_env["PDSH_SSH_ARGS_APPEND"] = (
            f"{base.get('PDSH_SSH_ARGS_APPEND', '')} -p {ssh_port}".strip())
    workers = []
    for rank, host in enumerate(hosts):
        job = process_env(
            coordinator=coordinator, num_processes=len(hosts), process_id=rank,
            local_device_count=host.slots, cpu_devices=cpu_devices,
            xla_flags=forwarded.get("XLA_FLAGS"), init_timeout=init_timeout,
            failure_timeout=failure_timeout)
        line = remote_command(cwd, {**forwarded, **(extra_env or {}), **job}, argv)
        if launcher == "ssh":
            port = ["-p", str(ssh_port)] if ssh_port is not None else []
            local = ["ssh", "-tt", "-o", "BatchMode=yes", *port, host.name, line]
        else:
            local = ["pdsh", "-S", "-R", "ssh", "-w", host.name, line]
        workers.append(Worker(rank, local, local_env, f"process {rank} on host {host.name}",
                              shlex.join(local), coordinator))
    return workers


# ---------------------------------------------------------------------------------------------
# Running and watching the processes


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _parent_death_signal() -> object | None:
    """A ``preexec_fn`` that makes a child get SIGTERM when the launcher dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _pump(pipe: IO[bytes], prefix: str, stream: IO[str], lock: threading.Lock) -> None:
    """Copy ``pipe`` to ``stream`` line by line, each line prefixed."""
    with pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n").removesuffix("\r")
            with lock:
                stream.write(f"{prefix}{line}\n")
                stream.flush()


class _Job:
    """The started processes, their output threads, and stopping them all."""

    def __init__(self, workers: Sequence[Worker], grace_s: float, out: IO[str], err: IO[str]):
        self.workers, self.grace_s, self.out, self.err = list(workers), grace_s, out, err
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.signals: list[int] = []

    def say(self, text: str) -> None:
        with self.lock:
            self.err.write(f"jds launch: {text}\n")
            self.err.flush()

    def start(self) -> None:
        preexec = _parent_death_signal()
        # All processes start before any reader thread: a fork with a preexec_fn is only safe
        # while no other thread of ours runs.
        for w in self.workers:
            try:
                self.procs.append(subprocess.Popen(
                    w.argv, env=w.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec))
            except OSError as e:
                self.signal_all(signal.SIGKILL)
                for p in self.procs:
                    p.wait()
                raise ValueError(f"could not start {w.label} ({shlex.join(w.argv[:1])}): "
                                 f"{e.strerror or e}") from e
        for w, p in zip(self.workers, self.procs, strict=True):
            for pipe, stream in ((p.stdout, self.out), (p.stderr, self.err)):
                t = threading.Thread(target=_pump, args=(pipe, f"[rank {w.rank}] ", stream,
                                                          self.lock), daemon=True)
                t.start()
                self.threads.append(t)

    def running(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.poll() is None]

    def signal_all(self, sig: int) -> None:
        """``sig`` to the process group of every process still running."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def wait(self, poll_s: float = 0.05) -> int:
        """Wait for every process; stop them all on the first failure or signal.

        Returns:
          0 when all exited 0; else the first failure's code (128 + signal number for a
          signal), or 128 + the signal the launcher received.
        """
        result: int | None = None
        stop_at: float | None = None  # when SIGTERM went out
        killed = False
        reported: set[int] = set()
        while True:
            for i, p in enumerate(self.procs):
                rc = p.poll()
                if rc is None or i in reported:
                    continue
                reported.add(i)
                if rc != 0 and result is None:
                    result = _exit_code(rc)
                    others = self.running()
                    self.say(f"{self.workers[i].label} (pid {p.pid}) exited with "
                             f"{_describe(rc)}"
                             + ("; stopping the other processes" if others else ""))
                    if others:
                        self.signal_all(signal.SIGTERM)
                        stop_at = time.monotonic()
            while self.signals:
                sig = self.signals.pop(0)
                name = signal.Signals(sig).name
                if stop_at is None:
                    self.say(f"received {name}; passing it on to the running processes")
                    result = result if result is not None else 128 + sig
                    self.signal_all(sig)
                    stop_at = time.monotonic()
                elif not killed:
                    self.say(f"received {name} again; killing the processes")
                    self.signal_all(signal.SIGKILL)
                    killed = True
            alive = self.running()
            if not alive:
                break
            if stop_at is not None and not killed and time.monotonic() - stop_at > self.grace_s:
                names = ", ".join(self.workers[i].label for i in alive)
                self.say(f"{names} still running {self.grace_s:g} s after SIGTERM "
                         "(--failure-timeout); sending SIGKILL")
                self.signal_all(signal.SIGKILL)
                killed = True
            time.sleep(poll_s)
        for t in self.threads:  # a grandchild may hold a pipe open: do not wait for it long
            t.join(timeout=2.0)
        if result:
            states = ", ".join(f"{w.label}: {_describe(p.returncode)}"
                               for w, p in zip(self.workers, self.procs, strict=True))
            self.say(f"failed with exit code {result} ({states})")
        return result or 0


def run_workers(
    workers: Sequence[Worker],
    *,
    failure_timeout: float = DEFAULT_FAILURE_TIMEOUT,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Start ``workers``, prefix their output, and stop them all when one fails.

    While it runs, SIGINT and SIGTERM to this process (from the main thread) are passed on to
    the workers instead of ending it.

    Args:
      workers: the processes (``local_workers`` / ``hostfile_workers``).
      failure_timeout: seconds between SIGTERM and SIGKILL when stopping them.
      out: where their stdout goes (default ``sys.stdout``).
      err: where their stderr and the launcher's messages go (default ``sys.stderr``).

    Returns:
      The job's exit code (``_Job.wait``).

    Raises:
      ValueError: a process could not be started (e.g. the command does not exist).
    """
    job = _Job(workers, failure_timeout, out or sys.stdout, err or sys.stderr)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda s, _f: job.signals.append(s))
    try:
        job.start()
        return job.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# Command line

_EPILOG = """\
examples:
  jds launch --nproc 2 --cpu-devices 4 -- jds train --config ds_config.json
      two processes on this machine, 4 simulated CPU devices each (8 in all), gloo between
  jds launch --nproc 8 --devices-per-proc 1 -- train.py
      one process per GPU of this machine (JDS_LOCAL_DEVICE_IDS=i)
  jds launch --hostfile hostfile -- jds train --config ds_config.json
      one process per host over ssh; hostfile lines: 'worker-1 slots=8'
  jds launch --hostfile hostfile --dry-run -- train.py --name "run 1"
      print the ssh commands only

variables each process gets: JDS_COORDINATOR (host:port), JDS_NUM_PROCESSES, JDS_PROCESS_ID,
JDS_LOCAL_DEVICE_COUNT, JDS_LOCAL_DEVICE_IDS, JDS_INIT_TIMEOUT, JDS_FAILURE_TIMEOUT, and with
--cpu-devices: JAX_PLATFORMS=cpu, XLA_FLAGS=...device_count=M, JDS_CPU_COLLECTIVES=gloo.
If one process fails, the others get SIGTERM, then SIGKILL after --failure-timeout seconds.

clusters with their own launcher (jds.init_distributed detects them; no jds launch):
  Slurm:     srun --nodes=4 --ntasks-per-node=1 jds train --config ds_config.json
             (scripts/launch/slurm_gpu.sbatch: sbatch --nodes=4 scripts/launch/slurm_gpu.sbatch)
  TPU pods:  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \\
                 --command 'cd jds && jds train --config ds_config.json'
             (scripts/launch/tpu_pod.sh)
"""


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``jds launch``'s arguments to ``p``."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nproc", type=int, metavar="N",
                       help="processes to start on this machine")
    where.add_argument("--hostfile", metavar="FILE",
                       help="DeepSpeed hostfile ('HOST slots=N' lines): one process per host, "
                       "started over ssh/pdsh")
    p.add_argument("--cpu-devices", type=int, metavar="M",
                   help="simulated CPU devices per process (JAX_PLATFORMS=cpu, gloo collectives)")
    p.add_argument("--devices-per-proc", type=int, metavar="K",
                   help="local mode on a GPU machine: process i drives devices i*K..i*K+K-1 "
                   "(JDS_LOCAL_DEVICE_IDS)")
    p.add_argument("--master-addr", metavar="ADDR",
                   help="coordinator address (default 127.0.0.1 with --nproc, the first host "
                   "with --hostfile)")
    p.add_argument("--master-port", type=int, metavar="PORT",
                   help="coordinator port (default: a free port with --nproc, "
                   f"{DEFAULT_HOSTFILE_PORT} with --hostfile)")
    p.add_argument("--num-nodes", type=int, metavar="N",
                   help="--hostfile: use only its first N hosts")
    p.add_argument("--launcher", choices=("ssh", "pdsh"), default="ssh",
                   help="--hostfile: how to reach the hosts (default ssh)")
    p.add_argument("--ssh-port", type=int, metavar="PORT",
                   help="--hostfile: ssh port of the hosts")
    p.add_argument("--chdir", metavar="DIR",
                   help="--hostfile: directory to run in on the hosts (default: the current "
                   "directory, which must exist there)")
    p.add_argument("--env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="--hostfile: extra variable for the remote processes (repeatable)")
    p.add_argument("--init-timeout", type=int, metavar="S",
                   help="seconds for every process to join (JDS_INIT_TIMEOUT; jds default 300)")
    p.add_argument("--failure-timeout", type=int, metavar="S",
                   help="seconds from SIGTERM to SIGKILL when stopping the job (default "
                   f"{DEFAULT_FAILURE_TIMEOUT}); also JDS_FAILURE_TIMEOUT, the heartbeat "
                   "timeout after which JAX ends the surviving processes")
    p.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                   help="the program: x.py / -m module / -c code (run by this Python), jds, or any "
                   "executable")
    p.set_defaults(func=run)
    return p


_DESCRIPTION = ("Start the processes of a multi-process jds job, prefix their output with "
                "their rank, and stop them all when one fails.")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``launch`` on the ``jds`` command's subparsers."""
    p = subparsers.add_parser(
        "launch", help="start a multi-process job: N local processes or one per host",
        description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure_parser(p)


def build_workers(args: argparse.Namespace) -> list[Worker]:
    """The processes ``args`` (``jds launch``'s) describe."""
    common = dict(master_port=args.master_port, cpu_devices=args.cpu_devices,
                  init_timeout=args.init_timeout, failure_timeout=args.failure_timeout)
    if args.hostfile:
        for flag in ("nproc", "devices_per_proc"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} is for local mode; with "
                                 "--hostfile every host runs one process using all its devices")
        hosts = parse_hostfile(args.hostfile)
        if args.num_nodes is not None:
            if not 1 <= args.num_nodes <= len(hosts):
                raise ValueError(f"--num-nodes {args.num_nodes}: hostfile {args.hostfile} "
                                 f"lists {len(hosts)} hosts")
            hosts = hosts[: args.num_nodes]
        return hostfile_workers(
            args.cmd, hosts, master_addr=args.master_addr, launcher=args.launcher,
            ssh_port=args.ssh_port, cwd=args.chdir, extra_env=dict(args.env), **common)
    if args.nproc is None:
        raise ValueError("say where to run: --nproc N (processes on this machine) or "
                         "--hostfile FILE (one process per host)")
    for flag in ("num_nodes", "ssh_port", "chdir"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is for --hostfile mode")
    if args.env:
        raise ValueError("--env is for --hostfile mode; locally, set the variable in the "
                         "shell that runs jds launch")
    return local_workers(args.cmd, args.nproc, master_addr=args.master_addr or "127.0.0.1",
                         devices_per_proc=args.devices_per_proc, **common)


def run(args: argparse.Namespace) -> int:
    """``jds launch``: start the job ``args`` describes and return its exit code.

    Raises:
      ValueError / FileNotFoundError: bad arguments or hostfile (messages for people).
    """
    workers = build_workers(args)
    if args.dry_run:
        for w in workers:
            print(w.shown)
        return 0
    where = (f"on hosts {', '.join(w.label.rsplit(' ', 1)[1] for w in workers)}"
             if args.hostfile else "on this machine")
    print(f"jds launch: {len(workers)} processes {where}; coordinator {workers[0].coordinator}",
          file=sys.stderr, flush=True)
    grace = DEFAULT_FAILURE_TIMEOUT if args.failure_timeout is None else args.failure_timeout
    return run_workers(workers, failure_timeout=grace)


def main(argv: Sequence[str] | None = None) -> int:
    """``jds launch`` on its own (``python -m jds.launch``); errors print plainly, code 2."""
    p = configure_parser(argparse.ArgumentParser(
        prog="jds launch", description=_DESCRIPTION,
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jds launch: error: {e}", file=sys.stderr)
        return 2


__all__ = [
    "DEFAULT_FAILURE_TIMEOUT",
    "Host",
    "Worker",
    "add_parser",
    "free_port",
    "hostfile_workers",
    "local_workers",
    "main",
    "parse_hostfile",
    "process_env",
    "remote_command",
    "resolve_command",
    "run",
    "run_workers",
    "with_device_count",
]

if __name__ == "__main__":
    sys.exit(main())
