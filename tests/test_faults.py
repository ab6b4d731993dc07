"""Faults injected into ``jds train``: damaged checkpoints, kills, resumes that ask too little.

Every trial ends with the run recovered: a damaged newest step costs only the steps since
the last intact one, once (the step is moved to ``checkpoints/damaged/``, never deleted, and
saved again when the run reaches it); a SIGKILL at any point — inside a save included —
followed by ``--resume`` replays steps whose losses are bit-identical to an uninterrupted
run's, with no step missing. ``-m slow`` adds a longer grid of kills and a killed process in
a two-process ``jds launch``. (The launcher's own handling of a dying process is in
``test_launch.py`` and ``test_multihost.py``.)
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import rows, write_config

from jds.cli import main

REPO = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> dict[int, list[float]]:
    """Every logged training loss by step (a replayed step is logged once per run)."""
    out: dict[int, list[float]] = {}
    for r in rows(run_dir):
        if "loss" in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def steps_on_disk(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run, saving every 2 steps: the in-process reference."""
    d = tmp_path_factory.mktemp("faults_straight")
    cfg = write_config(d / "c.json", steps=6, save_interval=2, keep_checkpoints=3)
    assert main(["train", "--config", cfg, "--out", str(d / "run"), "--no-progress"]) == 0
    return d / "run"


def _damage(step_dir: Path, kind: str) -> Path:
    """Damage one file of a committed step; returns the file."""
    if kind in ("array_flip", "array_truncate"):
        victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()
                      and p.parent.name == "d"), key=lambda p: p.stat().st_size)
        data = bytearray(victim.read_bytes())
        if kind == "array_flip":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        victim.write_bytes(bytes(data))
    elif kind == "array_metadata":
        victim = step_dir / "state" / "_METADATA"
        victim.write_text("{not json")
    elif kind == "loader_position":  # still valid JSON: only the manifest can tell
        victim = step_dir / "meta" / "metadata"
        meta = json.loads(victim.read_text())
        meta["client_state"]["data"]["index"] += 7
        victim.write_text(json.dumps(meta))
    elif kind == "meta_missing":
        victim = step_dir / "meta" / "metadata"
        victim.unlink()
    elif kind == "manifest":
        victim = step_dir / "jds_integrity.json"
        victim.write_text("garbage")
    else:
        raise AssertionError(kind)
    return victim


KINDS = ["array_flip", "array_truncate", "array_metadata", "loader_position", "meta_missing",
         "manifest"]


@pytest.mark.slow  # 54 s; every kind of damage is found and moved aside by default
@pytest.mark.parametrize("kind", ["array_flip", "loader_position"])
def test_damaged_newest_step_costs_only_the_steps_since_the_last_intact_one(straight, tmp_path,
                                                                           kind, capsys):
    cfg4 = write_config(tmp_path / "c4.json", steps=4, save_interval=2, keep_checkpoints=3)
    run = tmp_path / "run"
    assert main(["train", "--config", cfg4, "--out", str(run), "--no-progress"]) == 0
    ckpt = run / "checkpoints"
    assert steps_on_disk(ckpt) == [2, 4]
    victim = _damage(ckpt / "4", kind)

    # verify names the damaged step and file, without restoring
    capsys.readouterr()
    assert main(["checkpoints", "verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step 2: intact" in out and "step 4: damaged" in out
    assert str(victim).split("/checkpoints/")[1] in out.replace(str(ckpt) + "/", "")

    with pytest.warns(UserWarning, match=r"checkpoint step 4 is damaged .*moved it to "):
        assert main(["train", "--config", cfg4, "--out", str(run), "--steps", "6", "--resume",
                     "--no-progress"]) == 0
    moved = list((ckpt / "damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("4-") and (moved[0] / "state").is_dir()
    assert steps_on_disk(ckpt) == [2, 4, 6]  # step 4 saved again: the run did not die
    got, want = losses(run), losses(straight)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, values in got.items():  # steps 3-4 ran twice: both times as in one run
        assert values == [want[step][0]] * len(values), step
    assert len(got[3]) == 2 and len(got[5]) == 1  # the replay cost steps 3-4, once

    # now all intact; a resume that asks for no more steps is refused, plainly
    assert main(["checkpoints", "verify", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["train", "--config", cfg4, "--out", str(run), "--steps", "6", "--resume",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "at step 6 already" in err and "--steps greater than 6" in err


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_damage_is_found_moved_aside_and_the_step_saved_again(straight, tmp_path,
                                                                          kind):
    import shutil

    import jds
    from jds.checkpoint.recovery import scan

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    ckpt = run / "checkpoints"
    victim = _damage(ckpt / "6", kind)
    verdict = {st.step: st for st in scan(ckpt)}
    assert verdict[4].status == "intact" and verdict[6].status == "damaged"
    assert str(victim) in verdict[6].detail
    e = jds.initialize(model=jds.models.build("llama-tiny"),
                       config=json.loads((run / "config.json").read_text()))
    with pytest.warns(UserWarning, match=r"checkpoint step 6 is damaged .*moved it to "):
        e.load_checkpoint(ckpt)
    assert int(e.state.step) == 4 and steps_on_disk(ckpt) == [2, 4]
    e.save_checkpoint(ckpt, tag=6)  # the step number is free again
    e.wait_for_checkpoints()
    e.close()
    assert [st.status for st in scan(ckpt)] == ["intact"] * 3


def test_an_explicit_damaged_step_is_an_error_and_stays_where_it_is(straight, tmp_path):
    import shutil

    import jds
    from jds.checkpoint import CheckpointCorruptError

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    ckpt = run / "checkpoints"
    _damage(ckpt / "6", "array_flip")
    e = jds.initialize(model=jds.models.build("llama-tiny"),
                       config=json.loads((run / "config.json").read_text()))
    with pytest.raises(CheckpointCorruptError, match="CRC-32"):
        e.load_checkpoint(ckpt, tag=6)
    assert steps_on_disk(ckpt) == [2, 4, 6] and not (ckpt / "damaged").exists()
    e.close()


def test_retention_is_enforced_when_a_run_restarts(straight, tmp_path):
    """A kill between a save and Orbax's clean-up leaves keep+1 steps; a restart trims them."""
    import shutil

    import jds

    run = tmp_path / "run"
    shutil.copytree(straight, run)  # 3 steps: 2, 4, 6
    config = json.loads((run / "config.json").read_text())
    config["train"]["keep_checkpoints"] = 2
    e = jds.initialize(model=jds.models.build("llama-tiny"), config=config)
    e.load_checkpoint(run / "checkpoints")
    assert int(e.state.step) == 6
    assert steps_on_disk(run / "checkpoints") == [4, 6]
    e.close()


def test_smaller_faults_get_clear_messages(tmp_path, capsys):
    from jds.data.loader import BatchLoader

    with pytest.raises(ValueError, match=r"negative token ids \(min -5\)"):
        BatchLoader(np.array([3, -5, 7] * 400, np.int32), global_batch=2, seq_len=8,
                    vocab_size=256)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 12, "train": {"steps": 1}}))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"config file '{bad}'" in err and "train_batch_size=12" in err


# ------------------------------------------------------------------------------ kills
def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JDS_COMPILATION_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return env


def _train_cmd(cfg: str, run: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "jds.cli", "train", "--config", cfg, "--out", str(run),
           "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def _kill_during(cmd: list[str], env: dict, run: Path, how: str, after_step: int,
                 timeout: float = 240) -> str:
    """Run ``cmd`` and SIGKILL it: ``how="save"`` as soon as a save's temporary folder
    appears once step ``after_step`` is logged, ``how="step"`` at a random moment after
    that. Returns what happened ("save", "step", or "finished" if it ended first)."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt, metrics = run / "checkpoints", run / "metrics.jsonl"
    deadline, armed_at = time.monotonic() + timeout, None
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"jds train did not reach step {after_step} in {timeout} s")
            if armed_at is None:
                if metrics.exists() and any(r.get("step", 0) >= after_step
                                            for r in rows(run) if "loss" in r):
                    armed_at = time.monotonic()
                    delay = random.uniform(0.0, 1.5)
                time.sleep(0.02)
                continue
            if how == "save":
                if ckpt.is_dir() and any("orbax-checkpoint-tmp" in p for p in os.listdir(ckpt)):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return "save"
                time.sleep(0.0005)
            elif time.monotonic() - armed_at >= delay:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return "step"
            else:
                time.sleep(0.01)
        return "finished"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_and_resume(tmp_path: Path, kills: list[tuple[str, int]], steps: int = 8
                     ) -> tuple[dict, dict, list[str]]:
    cache = tmp_path / "xla"
    env = _env(cache)
    cfg = write_config(tmp_path / "c.json", steps=steps, save_interval=1, keep_checkpoints=2)
    ref = tmp_path / "straight"
    r = subprocess.run(_train_cmd(cfg, ref, False), env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run, events = tmp_path / "run", []
    for i, (how, after) in enumerate(kills):
        events.append(_kill_during(_train_cmd(cfg, run, i > 0), env, run, how, after))
    r = subprocess.run(_train_cmd(cfg, run, True), env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(run), losses(ref), events


def _check_replays(got: dict, want: dict, steps: int) -> None:
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)  # no step missing
    for step, values in got.items():  # replayed steps: bit-identical, every time
        assert set(values) == {want[step][0]}, (step, values, want[step])


@pytest.mark.slow  # 62 s; tests/test_checkpoint.py kills a save in the default run
def test_sigkill_inside_a_save_and_between_steps_then_resume_is_bit_identical(tmp_path):
    random.seed(0)
    got, want, events = _kill_and_resume(tmp_path, [("save", 2), ("step", 5)])
    _check_replays(got, want, 8)
    print("kills:", events)
    assert events[1] == "step", events


@pytest.mark.slow
def test_many_kills_at_random_points(tmp_path):
    random.seed(1)
    kills = [("save", 1), ("step", 2), ("save", 3), ("step", 4), ("save", 5), ("step", 7)]
    got, want, events = _kill_and_resume(tmp_path, kills, steps=10)
    _check_replays(got, want, 10)
    assert "save" in events, f"no kill landed inside a save: {events}"


@pytest.mark.slow
def test_a_killed_process_of_a_two_process_launch_then_resume(tmp_path):
    cfg = write_config(tmp_path / "c.json", steps=6, save_interval=1, keep_checkpoints=2)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "jds.cli", "launch", "--nproc", "2", "--cpu-devices", "4",
         "--", sys.executable, "-m", "jds.cli", "train", "--config", cfg, "--out", str(run),
         "--no-progress"], env=env, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "3").is_dir():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                              text=True).stdout.split()
    os.kill(int(children[-1]), signal.SIGKILL)
    t0 = time.monotonic()
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.monotonic() - t0 < 60, out[-2000:]
    assert "SIGKILL" in out or "killed" in out, out[-2000:]
    assert main(["train", "--config", cfg, "--out", str(run), "--resume", "--no-progress"]) == 0
    assert sorted(losses(run))[-1] == 6
