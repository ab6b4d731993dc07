"""``jds train``: run folder contents, resume continuity, errors for people."""

import json

import numpy as np
import pytest

from jds.cli import main


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
    final = [r for r in rows(straight) if "val_loss" in r][-1]
    assert final["step"] == 4 and np.isfinite(final["val_loss"])
    assert final["unigram_baseline"] > 0
    # save_interval 2 -> steps 2 and 4 kept (keep_checkpoints defaults to 2)
    assert sorted(int(p.name) for p in (straight / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4]
    assert list((straight / "tb").glob("events.out.tfevents.*"))
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
