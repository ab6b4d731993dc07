"""``jds train``: run folder contents, resume continuity, errors for people; ``jds explain`` and
``jds estimate``."""

import json
from pathlib import Path

import numpy as np
import pytest

from jds.cli import main
from jds.models import PRESETS


def write_config(path, steps, **train):
    cfg = {
        "train_batch_size": 16,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "steps_per_print": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-3,
                                                     "warmup_num_steps": 2,
                                                     "warmup_type": "linear"}},
        "train": {"model": "llama-tiny", "steps": steps, "seq_len": 32, "eval_interval": 0,
                  "eval_batches": 1, "sample_tokens": 8, **train},
    }
    path.write_text(json.dumps(cfg))
    return str(path)


def rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_rows(run_dir):
    return {r["step"]: r for r in rows(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 4-step run: the reference for the resume test."""
    d = tmp_path_factory.mktemp("straight")
    cfg = write_config(d / "ds_config.json", steps=4, save_interval=2)
    assert main(["train", "--config", cfg, "--out", str(d / "run"), "--no-progress"]) == 0
    return d / "run"


def test_run_folder_has_metrics_checkpoints_tensorboard_and_sample(straight):
    tr = train_rows(straight)
    assert sorted(tr) == [1, 2, 3, 4]
    for r in tr.values():
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu"} <= set(r)
        assert np.isfinite(r["loss"])
    # WarmupLR (DeepSpeed semantics): min lr on the first two steps, then linear to max
    np.testing.assert_allclose([tr[s]["lr"] for s in (1, 2, 3, 4)], [0, 0, 1.5e-3, 3e-3],
                               rtol=1e-6)
    assert np.isfinite(tr[4]["tokens_per_s"]) and tr[4]["tokens_per_s"] > 0
    assert tr[1]["tokens_per_s"] is None  # the compile step is not timed: null, valid JSON
    final = [r for r in rows(straight) if "val_loss" in r][-1]
    assert final["step"] == 4 and np.isfinite(final["val_loss"])
    assert final["unigram_baseline"] > 0
    # save_interval 2 -> steps 2 and 4 kept (keep_checkpoints defaults to 2)
    assert sorted(int(p.name) for p in (straight / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4]
    assert list((straight / "tb").glob("events.out.tfevents.*"))
    assert (straight / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_loss"] == final["val_loss"]
    sample = (straight / "sample.txt").read_text()
    assert sample.startswith("def ") and len(sample.encode("utf-8", "replace")) >= 4
    assert json.loads((straight / "config.json").read_text())["train"]["steps"] == 4


def test_resume_continues_with_the_next_batch(straight, tmp_path):
    cfg2 = write_config(tmp_path / "two.json", steps=2)
    out = tmp_path / "run"
    assert main(["train", "--config", cfg2, "--out", str(out), "--no-progress"]) == 0
    # --steps is the total: 2 more steps from the checkpoint at step 2
    assert main(["train", "--config", cfg2, "--out", str(out), "--steps", "4", "--resume",
                 "--no-progress"]) == 0
    got, want = train_rows(out), train_rows(straight)
    assert sorted(got) == [1, 2, 3, 4]
    # same data order, same optimizer state: the resumed steps equal the uninterrupted run's
    for s in (1, 2, 3, 4):
        np.testing.assert_allclose(got[s]["loss"], want[s]["loss"], rtol=1e-6)


@pytest.mark.slow  # 53 s; tests/test_multihost.py runs a two-process launch by default
def test_two_process_run_resumes_in_one_process(straight, tmp_path):
    """jds launch: 2 processes x 4 CPU devices train 2 steps (each reading its own rows);
    one process with 8 devices resumes from their checkpoint and data position."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cfg2 = write_config(tmp_path / "two.json", steps=2)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    # Both processes use one persistent compilation cache (as on a shared home folder).
    cache = tmp_path / "xla_cache"
    env.update(JDS_COMPILATION_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    r = subprocess.run(
        [sys.executable, "-m", "jds.cli", "launch", "--nproc", "2", "--cpu-devices", "4", "--",
         sys.executable, "-m", "jds.cli", "train", "--config", cfg2, "--out", str(out),
         "--no-progress"], env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert any(p.name.endswith("-cache") for p in cache.iterdir())
    assert (out / "sample.txt").read_text()  # sampled by both processes, written by one
    assert main(["train", "--config", cfg2, "--out", str(out), "--steps", "4", "--resume",
                 "--no-progress"]) == 0
    got, want = train_rows(out), train_rows(straight)
    assert sorted(got) == [1, 2, 3, 4]  # one metrics file: process 0 wrote it
    for s in (1, 2, 3, 4):
        np.testing.assert_allclose(got[s]["loss"], want[s]["loss"], rtol=1e-5)


def test_the_first_step_is_logged_whatever_steps_per_print(tmp_path):
    path = tmp_path / "c.json"
    write_config(path, steps=3)
    cfg = json.loads(path.read_text())
    cfg["steps_per_print"] = 10
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    assert sorted(train_rows(out)) == [1, 3]  # the first and the last


def test_cli_docs_are_generated_from_the_parsers():
    """docs/cli/ cannot drift from the code: it is what the parsers print."""
    from jds.cli import cli_doc_pages

    docs = Path(__file__).resolve().parents[1] / "docs" / "cli"
    pages = cli_doc_pages()
    assert {p.name for p in docs.glob("*.md")} == set(pages)
    for name, text in pages.items():
        assert (docs / name).read_text() == text, (
            f"docs/cli/{name} is out of date: run python scripts/make_cli_docs.py")
    assert "--resume" in pages["train.md"] and "(default: 8000)" in pages["serve.md"]


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    import jds

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"jds {jds.__version__}"
    r = subprocess.run([sys.executable, "-m", "jds", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"jds {jds.__version__}"


def test_compilation_cache_folder_off_and_jax_override(monkeypatch):
    from jds.cli import compilation_cache

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    for off in ("0", "off", ""):
        monkeypatch.setenv("JDS_COMPILATION_CACHE", off)
        assert compilation_cache() is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")
    assert compilation_cache() == "/somewhere"


def test_bad_config_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "gradient_clipping": "big"}))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "gradient_clipping" in err and "big" in err and "Traceback" not in err


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.json", steps=1)
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "empty"), "--resume",
                 "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_batch_that_does_not_divide_devices_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    write_config(cfg, steps=1)
    data = json.loads(cfg.read_text())
    data["train_batch_size"], data["gradient_accumulation_steps"] = 12, 1
    cfg.write_text(json.dumps(data))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train_batch_size" in err and "12" in err


# ------------------------------------------------------------------ jds explain / estimate
GOLDEN = Path(__file__).parent / "golden" / "sharding"


def run_json(capsys, *argv):
    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_explain_prints_the_golden_table_and_json(capsys):
    assert main(["explain", "--model", "llama-tiny", "--stage", "3"]) == 0
    assert capsys.readouterr().out == (GOLDEN / "llama-tiny__zero3-dp8.txt").read_text()
    rep = run_json(capsys, "explain", "--model", "llama-tiny", "--stage", "3", "--json")
    wq = next(p for p in rep["params"] if p["path"] == "layers/wq")
    assert wq["shape"] == [4, 128, 4, 32] and wq["axes"] == ["layers", "embed", "heads",
                                                             "head_dim"]
    assert wq["specs"]["params"] == [None, "data", "tensor", None]
    assert wq["bytes_per_device"] == {"params": 4 * 128 * 4 * 32 * 2 // 8,
                                      "grads": 4 * 128 * 4 * 32 * 4 // 8,
                                      "optimizer": 4 * 128 * 4 * 32 * 12 // 8}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_explain_and_estimate_run_on_every_preset(preset, capsys):
    rep = run_json(capsys, "explain", "--model", preset, "--stage", "3", "--json")
    assert rep["model"] == preset and rep["groups"] == {"params": 8, "grads": 8, "optimizer": 8}
    est = run_json(capsys, "estimate", "--model", preset, "--stage", "3", "--no-compile",
                   "--json")
    assert est["num_params"] == rep["num_params"]
    assert est["compiled"] is None
    # ZeRO-3 on 8 devices: every state is 1/8 of the whole, as the formula says
    f = est["formula"]["3"]
    assert est["state"]["params"] == f["params"] == 2 * rep["num_params"] / 8
    assert est["state"]["master"] + est["state"]["optimizer"] == f["master"] + f["optimizer"]


def test_estimate_and_explain_take_the_model_from_the_config(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.json", steps=1, model="gpt2-tiny")
    assert run_json(capsys, "explain", "--config", cfg, "--json")["model"] == "gpt2-tiny"
    est = run_json(capsys, "estimate", "--config", cfg, "--no-compile", "--json")
    assert est["model"] == "gpt2-tiny"
    # a Hugging Face folder: the model its config.json describes, no weights read
    hf = str(Path(__file__).parent / "fixtures" / "ds_reference" / "model")
    rep = run_json(capsys, "explain", "--model", hf, "--json")
    assert rep["num_params"] > 0 and any(p["path"] == "layers/wq" for p in rep["params"])
    # the pipeline axis is printed as such, not as a second "stage" beside ZeRO's
    assert main(["explain", "--config", cfg]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "pipeline=1" in head and "stage=" not in head


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_estimate_compiles_the_train_step(preset, capsys):
    rep = run_json(capsys, "estimate", "--model", preset, "--stage", "2", "--seq-len", "32",
                   "--json")
    c, state = rep["compiled"], rep["state"]
    batch_bytes = 1 * 32 * 4  # one int32 sequence of 32 tokens per device
    # the arguments are the state and the batch; the whole state is donated (aliased)
    assert c["state"] == state
    assert c["argument"] == state["total"] + batch_bytes
    assert c["alias"] == state["total"]
    assert c["temp"] > 0 and c["peak"] == c["argument"] + c["temp"] + c["output"] - c["alias"]
    assert state["params"] + state["master"] + state["optimizer"] == \
        rep["formula"]["2"]["persistent"]


def test_estimate_text_shows_formulas_deepspeed_and_state(capsys):
    assert main(["estimate", "--model", "llama-tiny", "--no-compile", "--stage", "1"]) == 0
    out = capsys.readouterr().out
    for line in ("stage 1 (config)", "DeepSpeed's estimator", "Train state per device",
                 "skipped (--no-compile)"):
        assert line in out


def test_estimate_reruns_in_a_fresh_process_for_more_devices(capsys):
    # this process has 8 CPU devices; 16 need a new process (JAX's device count is fixed)
    rep = run_json(capsys, "estimate", "--model", "llama-tiny", "--devices", "16", "--stage",
                   "3", "--no-compile", "--json")
    assert rep["devices"] == 16 and rep["mesh"]["data"] == 16
    assert rep["state"]["params"] == rep["formula"]["3"]["params"]


def test_estimate_layout_errors_are_clear(tmp_path, capsys):
    cfg = tmp_path / "tp3.json"
    cfg.write_text(json.dumps({"mesh": {"tensor": 3}}))
    assert main(["estimate", "--model", "llama-tiny", "--config", str(cfg), "--no-compile"]) == 2
    err = capsys.readouterr().err
    assert "mesh" in err and "Traceback" not in err
    assert main(["estimate", "--model", "llama-tiny", "--nodes", "3", "--no-compile"]) == 2
    assert "--nodes 3" in capsys.readouterr().err
