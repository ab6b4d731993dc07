"""The ``jds`` command's allocator setting (``jds.host_env``): when it applies, and that the
re-executed process gets it once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jds.host_env import OPT_OUT, TUNABLE, thp_mode, tuned_environ


def test_tuned_environ_adds_the_tunable_only_where_it_helps():
    base = {"PATH": "/bin"}
    env = tuned_environ(base, thp="madvise", glibc=True)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    assert base == {"PATH": "/bin"}  # the caller's mapping is not changed
    # Other tunables are kept, the new one appended.
    env = tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp="madvise",
                        glibc=True)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    # Nothing to do: THP always on / off, musl, already chosen, or the user's opt-out.
    assert tuned_environ(base, thp="always", glibc=True) is None
    assert tuned_environ(base, thp="never", glibc=True) is None
    assert tuned_environ(base, thp="madvise", glibc=False) is None
    assert tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp="madvise",
                         glibc=True) is None
    assert tuned_environ({OPT_OUT: "system"}, thp="madvise", glibc=True) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(f) == "madvise"
    assert thp_mode(tmp_path / "missing") is None


@pytest.mark.skipif(tuned_environ(os.environ) is None,
                    reason="this machine's allocator setting is already chosen or cannot help")
def test_reexec_happens_once_and_keeps_the_command():
    code = ("import os, sys\n"
            "from jds.host_env import reexec_with_huge_pages\n"
            "print('run', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)\n"
            "reexec_with_huge_pages()\n")
    out = subprocess.run([sys.executable, "-c", code, "a", "b"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    # The first run has no tunable and re-executes; the second has it and carries on.
    assert out == [f"run {os.environ.get('GLIBC_TUNABLES')} ['a', 'b']",
                   f"run {tuned_environ(os.environ)['GLIBC_TUNABLES']} ['a', 'b']"]


def test_engine_compiles_a_new_batch_shape_once_and_trims_in_between(caplog, monkeypatch):
    import jax
    import numpy as np
    from flax import nnx

    import jds
    from jds import host_env

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

    def loss_fn(model, batch):
        return ((model(batch["x"])[:, 0] - batch["y"]) ** 2).mean()

    trims = []
    monkeypatch.setattr("jds.engine.release_free_heap",
                        lambda: trims.append(1) or host_env.release_free_heap())
    engine = jds.initialize(model=Tiny(nnx.Rngs(0)), loss_fn=loss_fn,
                            config={"train_batch_size": 8}, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 4)).astype(np.float32),
             "y": rng.normal(size=(8,)).astype(np.float32)}
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        losses = [engine.train_batch(batch)["loss"] for _ in range(3)]
    compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
    assert len(compiles) == 1 and trims == [1]  # compiled ahead, trimmed, then reused
    assert losses[2] < losses[0]
