"""``jds plot`` and the curves a run draws: what is read from metrics.jsonl, what is drawn."""

import json
import math

import numpy as np
import pytest

from jds.cli import main
from jds.profiling import curves

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(d, rows, tail=""):
    d.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (d / "metrics.jsonl").write_text(text)
    return d


def lm_rows(n=6, scale=1.0):
    out = []
    for s in range(1, n + 1):
        out.append({"step": s, "loss": scale * 5 / s, "lr": 1e-3 * s, "grad_norm": 1.0 / s,
                    "loss_scale": 1.0, "skipped": 0,
                    "tokens_per_s": math.nan if s == 1 else 1000.0 + s, "mfu": 0.1})
        if s % 3 == 0:
            out.append({"step": s, "val_loss": scale * 6 / s})
    out.append({"step": n, "val_loss": scale * 6 / n, "unigram_baseline": 4.5})
    return out


def test_read_metrics_later_row_wins_nan_dropped_cut_last_line_ignored(tmp_path):
    rows = lm_rows(4)
    # a resume re-ran step 3 and 4 after a checkpoint at 2; the killed run's last line is cut
    rows += [{"step": 3, "loss": 0.25, "lr": 3e-3, "tokens_per_s": 7.0},
             {"step": 4, "loss": 0.125, "lr": 4e-3, "tokens_per_s": 8.0}]
    run = write_run(tmp_path / "run", rows, tail='{"step": 5, "lo')
    m = curves.read_metrics(run)
    assert m["loss"] == [(1, 5.0), (2, 2.5), (3, 0.25), (4, 0.125)]
    assert [s for s, _ in m["tokens_per_s"]] == [2, 3, 4]  # step 1's NaN (compile) left out
    assert m["val_loss"] == [(3, 2.0), (4, 1.5)]
    assert m["unigram_baseline"] == [(4, 4.5)]
    assert "skipped" in m and all(isinstance(v, float) for _, v in m["skipped"])


def test_read_metrics_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        curves.read_metrics(tmp_path)
    write_run(tmp_path / "bad", [{"step": 1, "loss": 1.0}], tail="not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        curves.read_metrics(tmp_path / "bad")


def test_plot_one_run_draws_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", lm_rows())
    out = curves.plot_runs([run], run / "curves.png")
    assert out.read_bytes()[:8] == PNG
    from matplotlib.image import imread

    img = imread(out)
    assert img.shape[:2] == (700, 1100)
    # four panels with ink in each quarter (a blank panel would be uniformly white)
    h, w = img.shape[0] // 2, img.shape[1] // 2
    for q in (img[:h, :w], img[:h, w:], img[h:, :w], img[h:, w:]):
        assert np.asarray(q[..., :3]).std() > 0.05
    assert not list(run.glob(".*.tmp"))  # written atomically


def test_cli_plot_default_paths_labels_and_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "a", lm_rows())
    b = write_run(tmp_path / "b", lm_rows(scale=0.5))
    assert main(["plot", str(a)]) == 0
    assert (a / "curves.png").read_bytes()[:8] == PNG
    both = tmp_path / "cmp" / "both.png"
    assert main(["plot", str(a), str(b / "metrics.jsonl"), "--out", str(both),
                 "--label", "base", "--label", "half"]) == 0
    assert both.read_bytes()[:8] == PNG
    capsys.readouterr()
    assert main(["plot", str(a), str(b), "--label", "one"]) == 2
    assert "2 runs" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    empty = write_run(tmp_path / "empty", [])
    assert main(["plot", str(empty)]) == 2
    assert "no logged values" in capsys.readouterr().err


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert not curves.have_matplotlib()
    run = write_run(tmp_path / "run", lm_rows())
    with pytest.raises(ImportError, match=r"jds\[plot\]"):
        curves.plot_runs([run], tmp_path / "x.png")
