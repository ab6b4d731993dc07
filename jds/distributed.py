"""Joining JAX's distributed runtime: ``init_distributed`` with cluster auto-detection.

jds runs on JAX's own multi-controller runtime (``jax.distributed``; XLA collectives over
NCCL on GPU clusters, ICI/DCN on TPU pods, gloo between CPU processes), one process per host.
``init_distributed()`` finds the coordinator, the process count and this process's id, in
this order:

1. explicit arguments;
2. jds's variables, set by ``jds launch``: ``JDS_COORDINATOR`` (``host:port``),
   ``JDS_NUM_PROCESSES``, ``JDS_PROCESS_ID``, and optionally ``JDS_LOCAL_DEVICE_IDS``
   (comma-separated), ``JDS_INIT_TIMEOUT`` and ``JDS_FAILURE_TIMEOUT`` (seconds), and
   ``JDS_LOCAL_DEVICE_COUNT`` (checked after joining: a process that sees another number of
   devices, e.g. one GPU per node under a scheduler's binding, is an error);
3. Open MPI's ``OMPI_COMM_WORLD_SIZE`` / ``OMPI_COMM_WORLD_RANK`` with ``JDS_COORDINATOR``
   or ``MASTER_ADDR``/``MASTER_PORT`` for the address;
4. otherwise JAX's own cluster detection (Slurm, Cloud TPU pods, GKE, MPI via mpi4py), which
   needs no arguments at all.

A single process with none of these set is not distributed and nothing happens.

Start-up never hangs silently: with a known coordinator the processes first meet on its
port + 1 (``_rendezvous``), and after ``JDS_INIT_TIMEOUT`` (default 300 s) process 0 names the
processes that did not join and the others say they could not reach process 0; JAX's own
deadline would end them with an uncatchable fatal log naming neither.

Failures later are bounded too: ``JDS_FAILURE_TIMEOUT`` (default 60 s) is JAX's
heartbeat timeout, after which the coordination service ends the surviving processes with an
error instead of leaving them waiting in a collective; ``jds launch`` additionally stops every
process as soon as one exits abnormally.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands: ``process_id`` of ``num_processes``, and how it was found."""

    num_processes: int
    process_id: int
    coordinator: str | None
    source: str


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _detect() -> tuple[str | None, int | None, int | None, str]:
    """(coordinator, num_processes, process_id, source) from the environment."""
    coord = os.environ.get("JDS_COORDINATOR") or None
    n, pid = _env_int("JDS_NUM_PROCESSES"), _env_int("JDS_PROCESS_ID")
    if n is not None or pid is not None or coord is not None:
        missing = [k for k, v in (("JDS_COORDINATOR", coord), ("JDS_NUM_PROCESSES", n),
                                  ("JDS_PROCESS_ID", pid)) if v is None]
        if missing and (n or 1) > 1:
            raise ValueError(
                f"jds distributed variables are incomplete: {missing} unset; set all of "
                "JDS_COORDINATOR, JDS_NUM_PROCESSES and JDS_PROCESS_ID (jds launch does)"
            )
        return coord, n, pid, "JDS_* variables"
    n, pid = _env_int("OMPI_COMM_WORLD_SIZE"), _env_int("OMPI_COMM_WORLD_RANK")
    if n is not None and pid is not None:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not (addr and port):
            raise ValueError(
                "Open MPI launch detected (OMPI_COMM_WORLD_SIZE) but no coordinator: set "
                "JDS_COORDINATOR=host:port or MASTER_ADDR and MASTER_PORT"
            )
        return f"{addr}:{port}", n, pid, "Open MPI"
    if "SLURM_JOB_ID" in os.environ and _env_int("SLURM_NTASKS") not in (None, 1):
        return None, None, None, "Slurm (JAX cluster detection)"
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        return None, None, None, "Cloud TPU (JAX cluster detection)"
    return None, None, None, "none"


def is_initialized() -> bool:
    """Whether this process has joined a distributed runtime."""
    from jax._src import distributed

    return distributed.global_state.client is not None


def init_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    init_timeout: int | None = None,
    failure_timeout: int | None = None,
) -> DistributedInfo:
    """Join JAX's distributed runtime if this process is part of a multi-process job.

    Call before any other JAX use (``jds.initialize`` calls it). Idempotent.

    Args:
      coordinator: ``host:port`` of process 0's coordinator; default from the environment.
      num_processes: total processes; default from the environment.
      process_id: this process's id; default from the environment.
      local_device_ids: devices this process drives (e.g. one GPU per process); default
        ``JDS_LOCAL_DEVICE_IDS`` or all visible.
      init_timeout: seconds to wait for every process to join (``JDS_INIT_TIMEOUT``, 300).
      failure_timeout: seconds without a heartbeat before a process counts as dead and the
        others stop (``JDS_FAILURE_TIMEOUT``, 60).

    Returns:
      ``DistributedInfo`` (``num_processes == 1`` when not distributed).

    Raises:
      ValueError: incomplete or malformed variables (named).
      RuntimeError: the processes did not all join within ``init_timeout`` (the message
        names the coordinator, this process and the expected count).
    """
    if is_initialized():
        return DistributedInfo(jax.process_count(), jax.process_index(), coordinator,
                               "already initialized")
    env_coord, env_n, env_pid, source = _detect()
    coordinator = coordinator or env_coord
    num_processes = num_processes if num_processes is not None else env_n
    process_id = process_id if process_id is not None else env_pid
    if num_processes is not None and num_processes <= 1 and source != "none":
        return DistributedInfo(1, 0, coordinator, source)
    if source == "none" and coordinator is None and num_processes is None:
        return DistributedInfo(1, 0, None, "none")
    if local_device_ids is None and os.environ.get("JDS_LOCAL_DEVICE_IDS"):
        try:
            local_device_ids = [int(x) for x in os.environ["JDS_LOCAL_DEVICE_IDS"].split(",")]
        except ValueError:
            raise ValueError("JDS_LOCAL_DEVICE_IDS must be comma-separated integers, got "
                             f"{os.environ['JDS_LOCAL_DEVICE_IDS']!r}") from None
    init_timeout = init_timeout or _env_int("JDS_INIT_TIMEOUT") or 300
    failure_timeout = failure_timeout or _env_int("JDS_FAILURE_TIMEOUT") or 60
    if os.environ.get("JDS_CPU_COLLECTIVES") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU processes talk over gloo (the default "none" cannot cross processes).
        jax.config.update("jax_cpu_collectives_implementation",
                          os.environ.get("JDS_CPU_COLLECTIVES", "gloo"))
    if coordinator is not None and num_processes and num_processes > 1 and \
            os.environ.get("JDS_RENDEZVOUS", "1") != "0":
        _rendezvous(coordinator, int(num_processes), int(process_id), int(init_timeout))
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=int(init_timeout),
            heartbeat_timeout_seconds=int(failure_timeout),
        )
    except Exception as e:  # jaxlib raises XlaRuntimeError / RuntimeError / ValueError
        text = str(e).strip().splitlines()
        raise RuntimeError(
            f"jds.init_distributed: process {process_id} of {num_processes} could not join "
            f"the job at coordinator {coordinator} within {init_timeout} s ({source}); "
            "check that every process started, that they agree on the coordinator address "
            "and process count, and that the port is reachable. JAX said: "
            + (text[0][:400] if text else type(e).__name__)
        ) from e
    expected = _env_int("JDS_LOCAL_DEVICE_COUNT")
    if expected is not None and jax.local_device_count() != expected:
        raise RuntimeError(
            f"process {jax.process_index()} sees {jax.local_device_count()} local devices "
            f"({[str(d) for d in jax.local_devices()]}) but the launch expects {expected} "
            "(hostfile slots / --cpu-devices / --devices-per-proc); check CUDA_VISIBLE_DEVICES "
            "or the scheduler's GPU binding"
        )
    return DistributedInfo(jax.process_count(), jax.process_index(), coordinator, source)


def _rendezvous(coordinator: str, n: int, pid: int, timeout: int) -> None:
    """Wait until all ``n`` processes are up, or fail naming the missing ones.

    JAX's coordination service ends a process that waits past its deadline with a fatal log
    line ("Deadline Exceeded") that names neither the coordinator nor the absent processes,
    and Python cannot catch it. So jds meets first on the coordinator's port + 1 (a plain
    TCP exchange of process ids): process 0 waits for ids 1..n-1, the others for process 0.
    ``JDS_RENDEZVOUS=0`` skips it (e.g. when port + 1 is not open between hosts).
    """
    host, _, port = coordinator.rpartition(":")
    addr = (host or "127.0.0.1", int(port) + 1)
    deadline = time.monotonic() + timeout
    if pid == 0:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("", addr[1]))
        srv.listen(n)
        joined: dict[int, socket.socket] = {}
        try:
            while len(joined) < n - 1:
                srv.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    missing = sorted(set(range(1, n)) - set(joined))
                    raise RuntimeError(
                        f"jds.init_distributed: process 0 (coordinator {coordinator}) waited "
                        f"{timeout} s for {n} processes; processes {missing} did not join. "
                        "Check that they were started with the same JDS_COORDINATOR and "
                        "JDS_NUM_PROCESSES, and that port "
                        f"{addr[1]} is reachable from their hosts"
                    ) from None
                conn.settimeout(10)
                joined[int(conn.recv(16).decode() or -1)] = conn
            for conn in joined.values():
                conn.sendall(b"go")
        finally:
            for conn in joined.values():
                conn.close()
            srv.close()
        return
    while True:
        try:
            with socket.create_connection(addr, timeout=5) as conn:
                conn.sendall(str(pid).encode())
                conn.settimeout(max(deadline - time.monotonic(), 0.01))
                if conn.recv(2) == b"go":
                    return
        except (ConnectionRefusedError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"jds.init_distributed: process {pid} of {n} could not reach process 0 at "
                f"{addr[0]}:{addr[1]} (coordinator {coordinator}) within {timeout} s; is "
                "process 0 running, and are all processes started together?"
            )
        time.sleep(0.2)


class PeerFailureError(RuntimeError):
    """A collective failed in a multi-process run: another process most likely died."""


@contextlib.contextmanager
def peer_failure_guard(what: str) -> Iterator[None]:
    """Turn a failed cross-process collective into a ``PeerFailureError`` that says so.

    Single-process errors pass through unchanged.
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise PeerFailureError(
            f"{what} failed in process {jax.process_index()} of {jax.process_count()}: a "
            "collective with the other processes broke, so another process most likely "
            "died (see its log, or jds launch's message). The last good checkpoint is intact; "
            f"restart the job with --resume. JAX said: {first}"
        ) from e


def exit_after_peer_failure(err: BaseException, code: int = 3) -> None:
    """Print ``err`` and leave at once.

    A normal exit would wait in JAX's shutdown barrier for the dead process until the
    heartbeat timeout and then abort; ``os._exit`` skips it (output is flushed first).
    """
    print(f"jds: error: {err}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = [
    "DistributedInfo",
    "PeerFailureError",
    "exit_after_peer_failure",
    "init_distributed",
    "is_initialized",
    "peer_failure_guard",
]
