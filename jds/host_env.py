"""Host memory for XLA:CPU: huge pages for the ``jds`` command's buffers, and the compiler's
freed heap given back before a new step first runs (``release_free_heap``).

Why: XLA:CPU allocates each execution's temporaries as one block (its buffer assignment)
and frees it when the execution ends. glibc's malloc serves blocks above 32 MiB with a fresh
``mmap`` and returns them with ``munmap``, so every training step touches its whole
temporary block for the first time: 4 KiB page faults, each zeroed by the kernel. On a
3.0M-parameter Llama training step (8 x 256 tokens, fp32) that is about 110,000 page faults
per step, and on a virtual machine each one is expensive. PyTorch does not pay this (its
tensors are separate blocks under 32 MiB that malloc reuses from its heap).

What: with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc marks its large blocks
``MADV_HUGEPAGE``, so the kernel backs them with 2 MiB pages: about 700 faults per step, and
the step above runs 1.2-1.5x faster (``docs/benchmarks.md``, 2026-12-06). glibc reads its
tunables only when a process starts, so the ``jds`` command (``jds.cli.entry``) re-executes
itself once with the tunable added, before anything is imported, when all of these hold:
Linux with glibc, transparent huge pages in ``madvise`` mode (in ``always`` mode every
mapping gets them already, in ``never`` mode the setting cannot help), ``GLIBC_TUNABLES``
does not set ``glibc.malloc.hugetlb`` already, and ``JDS_HOST_ALLOCATOR`` is not
``system`` (the opt-out). Processes the command starts (``jds launch`` workers) inherit it.

Python programs that import jds start before jds can choose, so they get the same speed by
starting with the variable set: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py``
(``tuned_environ`` builds that environment; ``scripts/bench_vs_deepspeed.py`` uses it).

Other allocator settings were measured and not taken: disabling malloc's ``mmap`` with one
arena (``MALLOC_MMAP_MAX_=0``, ``MALLOC_ARENA_MAX=1``, no trimming) removes the faults but
was slower than huge pages on the same step (0.61-0.66 vs 0.45-0.56 s/step), and the same
settings made with ``mallopt`` after start-up do not reach XLA's worker threads' arenas.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JDS_HOST_ALLOCATOR"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or None
    where the kernel does not say (not Linux, or no THP support)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


def _is_glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def tuned_environ(environ: Mapping[str, str], *, thp: str | None = None,
                  glibc: bool | None = None) -> dict[str, str] | None:
    """``environ`` with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES``, or None where
    the setting would change nothing or the user chose otherwise (see the module docstring).

    ``thp`` and ``glibc`` default to this machine's transparent huge page mode and C library.
    """
    if environ.get(OPT_OUT, "").strip().lower() == "system":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    if not (_is_glibc() if glibc is None else glibc):
        return None
    if (thp_mode() if thp is None else thp) != "madvise":
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


_LIBC: Any = None  # glibc, loaded on first use; False where there is none


def release_free_heap() -> bool:
    """Give memory that malloc holds free back to the system (glibc's ``malloc_trim``);
    False where there is no glibc.

    XLA's compiler frees its working memory into malloc's heap when it is done (~250 MB
    for a small Llama training step), and glibc keeps it: the step's first execution then
    maps its temporaries on top of it, and the process's peak RSS is compile heap plus
    step. ``TrainEngine.train_batch`` compiles a new batch shape ahead of running it and
    calls this in between: the 3.0M-parameter Llama step's peak RSS fell from 950 to
    751 MB (770 MB in ``scripts/bench_vs_deepspeed.py``'s run, where DeepSpeed's is 735).
    """
    global _LIBC
    if _LIBC is None:
        if not sys.platform.startswith("linux") or not _is_glibc():
            _LIBC = False
        else:
            try:
                _LIBC = ctypes.CDLL("libc.so.6")
            except OSError:
                _LIBC = False
    if _LIBC is False:
        return False
    _LIBC.malloc_trim(0)
    return True


def reexec_with_huge_pages() -> None:
    """Replace this process with the same command under ``tuned_environ`` (once: the new
    process finds the tunable set). Does nothing once JAX is imported (its buffers would be
    allocated before the change), off Linux, or when ``tuned_environ`` says no."""
    if "jax" in sys.modules or not sys.platform.startswith("linux"):
        return
    env = tuned_environ(os.environ)
    if env is None:
        return
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # an interpreter we cannot re-run: carry on with the default allocator
        return


__all__ = ["OPT_OUT", "TUNABLE", "reexec_with_huge_pages", "release_free_heap", "thp_mode",
           "tuned_environ"]
