"""Reading real DeepSpeed ZeRO-1/2/3 checkpoints (``jds.checkpoint.convert.deepspeed``).

Fixtures: ``tests/fixtures/ds_checkpoints/zeroN`` written by DeepSpeed itself
(``scripts/make_deepspeed_checkpoints.py``: the ds_reference training, saved after 6 optimizer
steps on 2 CPU ranks). Every tensor is held to DeepSpeed's own ``zero_to_fp32`` on the same
files; the padding paths these fixtures do not reach (odd shapes, 3 ranks, per-parameter
alignment padding, several groups, buffers, frozen and tied parameters) are covered by small
checkpoints written here in DeepSpeed's layout and read by both readers.
"""

from __future__ import annotations

import fractions
import json
import math
import os
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jds.checkpoint.convert.deepspeed import (  # noqa: E402
    DeepSpeedCheckpoint,
    safe_torch_load,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ds_checkpoints"
REFERENCE = Path(__file__).parent / "fixtures" / "ds_reference"
STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def zero_to_fp32():
    return pytest.importorskip("deepspeed.utils.zero_to_fp32")


@pytest.fixture(scope="module")
def checkpoints():
    return {stage: DeepSpeedCheckpoint(FIXTURES / f"zero{stage}") for stage in STAGES}


def _reference(zero_to_fp32, path: Path) -> dict[str, np.ndarray]:
    state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path))
    return {name: t.detach().numpy() for name, t in state.items()}


# --- the real DeepSpeed checkpoints ----------------------------------------------------------


def test_fixture_info_matches_reference():
    """The fixtures' post-save losses are DeepSpeed's reference run: saving changed nothing."""
    for stage in STAGES:
        info = json.loads((FIXTURES / f"zero{stage}" / "info.json").read_text())
        reference = json.loads((REFERENCE / f"reference_zero{stage}.json").read_text())
        assert (info["zero_stage"], info["world_size"], info["step"]) == (stage, 2, 6)
        assert info["losses_after_save"]["values"] == [s["loss"] for s in reference["steps"][6:12]]
        assert not (FIXTURES / f"zero{stage}" / "zero_to_fp32.py").exists()


@pytest.mark.parametrize("stage", STAGES)
def test_metadata(checkpoints, stage):
    ckpt = checkpoints[stage]
    assert (ckpt.stage, ckpt.world_size, ckpt.step, ckpt.global_steps) == (stage, 2, 6, 6)
    assert ckpt.ds_config == json.loads((REFERENCE / f"ds_config_zero{stage}.json").read_text())
    assert ckpt.dir.name == "global_step6"
    shapes = ckpt.param_shapes
    assert len(shapes) == 21 and ckpt.names() == list(shapes)
    assert shapes["model.embed_tokens.weight"] == (256, 64)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    # A tag directory reads the same as the root.
    assert DeepSpeedCheckpoint(ckpt.dir).param_shapes == shapes
    assert DeepSpeedCheckpoint(ckpt.dir.parent, tag="global_step6").step == 6


@pytest.mark.parametrize("stage", STAGES)
def test_fp32_equals_deepspeed_zero_to_fp32(checkpoints, zero_to_fp32, stage):
    ckpt = checkpoints[stage]
    expected = _reference(zero_to_fp32, FIXTURES / f"zero{stage}")
    assert ckpt.names() == list(expected)
    for name, want in expected.items():
        got = ckpt.fp32(name)
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, name
        assert np.array_equal(got, want), name


def test_fp32_agrees_with_module_and_across_stages(checkpoints):
    """ZeRO-1/2 also store the (fp32) module weights whole; ZeRO-3 trained the same weights."""
    for stage in (1, 2):
        module = safe_torch_load(checkpoints[stage].dir / "mp_rank_00_model_states.pt")["module"]
        for name in checkpoints[stage].names():
            assert np.array_equal(checkpoints[stage].fp32(name), module[name].numpy()), name
    for name in checkpoints[1].names():
        first = checkpoints[1].fp32(name)
        assert not np.array_equal(first, np.zeros_like(first))
        for stage in (2, 3):
            np.testing.assert_allclose(checkpoints[stage].fp32(name), first, rtol=0, atol=1e-6)


def test_moments_consistent_across_stages(checkpoints):
    """The three stages trained identically, so Adam's moments agree though laid out apart."""
    b1, b2, step = 0.9, 0.999, 6
    # |m|^2 <= c * v for any gradients (Cauchy-Schwarz over Adam's 6 exponential sums).
    c = (1 - b1) ** 2 / (1 - b2) * sum((b1 * b1 / b2) ** k for k in range(step))
    for name, shape in checkpoints[1].param_shapes.items():
        m1, v1 = checkpoints[1].moments(name)
        assert m1.shape == v1.shape == shape and m1.dtype == np.float32
        assert np.abs(m1).max() > 0 and (v1 > 0).mean() > 0.9 and (v1 >= 0).all(), name
        assert (m1.astype(np.float64) ** 2 <= c * v1 * (1 + 1e-5) + 1e-30).all(), name
        for stage in (2, 3):
            m, v = checkpoints[stage].moments(name)
            np.testing.assert_allclose(m, m1, rtol=0, atol=1e-6, err_msg=f"{stage} {name}")
            np.testing.assert_allclose(v, v1, rtol=1e-3, atol=1e-12, err_msg=f"{stage} {name}")


# --- safety and errors -----------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``os.system`` (if a loader lets it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy(stage: int, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / f"zero{stage}", tmp_path / f"zero{stage}"))


def test_pickled_code_is_refused(tmp_path):
    root = _copy(2, tmp_path)
    marker = tmp_path / "pwned"
    target = root / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"x": _Payload(marker)}}, target)
    with pytest.raises(ValueError, match="never unpickles arbitrary objects") as err:
        DeepSpeedCheckpoint(root)
    assert target.name in str(err.value) and "system" in str(err.value)
    assert not marker.exists()

    custom = tmp_path / "custom.pt"
    torch.save({"cfg": fractions.Fraction(1, 3)}, custom)
    with pytest.raises(ValueError, match=r"refusing to unpickle fractions\.Fraction"):
        safe_torch_load(custom)


def test_missing_rank_files_are_named(tmp_path):
    root = _copy(3, tmp_path)
    (root / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        DeepSpeedCheckpoint(root)

    root = _copy(1, tmp_path / "b")
    (root / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        DeepSpeedCheckpoint(root)

    root = _copy(3, tmp_path / "c")
    (root / "global_step6" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_1_mp_rank_00_model_states.pt"):
        DeepSpeedCheckpoint(root)


def test_contradicting_and_foreign_directories(tmp_path):
    root = _copy(2, tmp_path)
    zero1_rank1 = FIXTURES / "zero1" / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(zero1_rank1, root / "global_step6" / zero1_rank1.name)
    with pytest.raises(ValueError, match="different runs"):
        DeepSpeedCheckpoint(root)

    root = _copy(3, tmp_path / "b")
    extra = root / "global_step6" / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    shutil.copy(root / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", extra)
    with pytest.raises(ValueError, match=r"ranks \[2\].*world size of 2"):
        DeepSpeedCheckpoint(root)

    with pytest.raises(ValueError, match="is not a DeepSpeed checkpoint"):
        DeepSpeedCheckpoint(REFERENCE)
    with pytest.raises(FileNotFoundError, match="global_step7"):
        DeepSpeedCheckpoint(FIXTURES / "zero1", tag="global_step7")


def test_missing_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install jds\[convert\]"):
        safe_torch_load(FIXTURES / "zero1" / "latest")


# --- padding, groups, buffers, frozen and tied parameters: DeepSpeed's layout, written here ----

_WS = 3
_GROUPS = [
    OrderedDict(a=(3, 5), b=(7,), c=(2, 3, 2)),
    OrderedDict(d=(5, 1)),
]
_PARAM_PADDINGS = [[1, 0, 0], [0]]  # ZeRO-1/2 per-parameter alignment padding (last is 0)


def _truth(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        key: {
            name: rng.standard_normal(shape).astype(np.float32)
            for group in _GROUPS
            for name, shape in group.items()
        }
        for key in ("fp32", "exp_avg", "exp_avg_sq")
    }


def _model_state(frozen_fragment, stage: int) -> dict:
    return {
        "module": OrderedDict(
            buf=torch.arange(4), fbuf=torch.tensor([0.5, -1.5], dtype=torch.float16)
        ),
        "buffer_names": ["buf", "fbuf"],
        "param_shapes": [
            OrderedDict((n, torch.Size(s)) for n, s in group.items()) for group in _GROUPS
        ],
        "frozen_param_shapes": OrderedDict(f=torch.Size([2, 2])),
        "frozen_param_fragments": OrderedDict(f=frozen_fragment),
        "shared_params": {"tied.weight": "a"},
        "global_steps": 4,
        "dp_world_size": _WS,
        "ds_config": {"zero_optimization": {"stage": stage}},
        "ds_version": "0.19.8",
    }


def _write_zero2(root: Path, truth, elastic: bool) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ckpt = root / "global_step4"
    ckpt.mkdir(parents=True)
    (root / "latest").write_text("global_step4")
    frozen = torch.arange(4, dtype=torch.float32).reshape(2, 2)
    torch.save(_model_state(frozen, 2), ckpt / "mp_rank_00_model_states.pt")
    flats = {key: [] for key in truth}  # key -> group -> full padded flat
    tails = []
    for g, group in enumerate(_GROUPS):
        for key in truth:
            parts = []
            for (name, _), pad in zip(group.items(), _PARAM_PADDINGS[g], strict=True):
                parts += [truth[key][name].reshape(-1), np.zeros(pad, np.float32)]
            flat = np.concatenate(parts)
            tail = -flat.size % (2 * _WS)
            flats[key].append(np.concatenate([flat, np.zeros(tail, np.float32)]))
        tails.append(tail)
    for r in range(_WS):
        part = {key: [] for key in truth}
        lean = {key: [] for key in truth}
        group_paddings = []
        for g in range(len(_GROUPS)):
            size = flats["fp32"][g].size // _WS
            end = flats["fp32"][g].size - tails[g]
            lo, hi = r * size, (r + 1) * size
            group_paddings.append(hi - max(lo, min(hi, end)))
            for key in truth:
                part[key].append(torch.from_numpy(flats[key][g][lo:hi].copy()))
                lean[key].append(torch.from_numpy(flats[key][g][lo : min(hi, end)].copy()))
        if elastic:
            base = [
                {"step": 4, "exp_avg": lean["exp_avg"][g], "exp_avg_sq": lean["exp_avg_sq"][g]}
                for g in range(len(_GROUPS))
            ]
        else:
            base = {
                "state": {
                    g: {
                        "step": 4,
                        "exp_avg": part["exp_avg"][g],
                        "exp_avg_sq": part["exp_avg_sq"][g],
                    }
                    for g in range(len(_GROUPS))
                },
                "param_groups": [{"lr": 1e-3, "params": [g]} for g in range(len(_GROUPS))],
            }
        opt = {
            "loss_scaler": LossScaler(1.0),
            "base_optimizer_state": base,
            "single_partition_of_fp32_groups": lean["fp32"],
            "zero_stage": ZeroStageEnum.gradients,
            "group_paddings": group_paddings,
            "param_alignment_paddings": _PARAM_PADDINGS,
            "partition_count": [_WS] * len(_GROUPS),
        }
        if elastic:
            opt["base_optimizer_state_step"] = 4
        torch.save(
            {"optimizer_state_dict": opt}, ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        )


def _write_zero3(root: Path, truth) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ckpt = root / "global_step4"
    ckpt.mkdir(parents=True)
    (root / "latest").write_text("global_step4")
    frozen = np.arange(4, dtype=np.float32)
    frozen_parts = np.concatenate([frozen, np.zeros(2, np.float32)]).reshape(_WS, 2)

    def partition(value: np.ndarray) -> np.ndarray:  # [WS, ceil(numel / WS)], zero-padded
        per_rank = math.ceil(value.size / _WS)
        padded = np.zeros(per_rank * _WS, np.float32)
        padded[: value.size] = value.reshape(-1)
        return padded.reshape(_WS, per_rank)

    for r in range(_WS):
        model = _model_state(torch.from_numpy(frozen_parts[r].copy()), 3)
        torch.save(model, ckpt / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        sub = {
            key: [
                torch.from_numpy(np.concatenate([partition(truth[key][n])[r] for n in group]))
                for group in _GROUPS
            ]
            for key in truth
        }
        opt = {
            "zero_stage": ZeroStageEnum.weights,
            "loss_scaler": LossScaler(1.0),
            "partition_count": _WS,
            "optimizer_state_dict": {
                "state": {
                    g: {
                        "step": torch.tensor(4.0),
                        "exp_avg": sub["exp_avg"][g],
                        "exp_avg_sq": sub["exp_avg_sq"][g],
                    }
                    for g in range(len(_GROUPS))
                },
                "param_groups": [{"lr": 1e-3, "params": list(range(len(_GROUPS)))}],
            },
            "fp32_flat_groups": sub["fp32"],
        }
        torch.save(
            {"optimizer_state_dict": opt}, ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        )


@pytest.mark.parametrize("layout", ["zero2", "zero2-elastic", "zero3"])
def test_padded_layouts_match_zero_to_fp32(tmp_path, zero_to_fp32, layout):
    truth = _truth(seed=len(layout))
    if layout == "zero3":
        _write_zero3(tmp_path, truth)
    else:
        _write_zero2(tmp_path, truth, elastic=layout.endswith("elastic"))
    ckpt = DeepSpeedCheckpoint(tmp_path)
    assert (ckpt.stage, ckpt.world_size, ckpt.step) == (3 if layout == "zero3" else 2, _WS, 4)
    expected = _reference(zero_to_fp32, tmp_path)
    assert ckpt.names() == list(expected) == ["buf", "fbuf", "f", "a", "b", "c", "d", "tied.weight"]
    for name, want in expected.items():
        got = ckpt.fp32(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), name
    assert np.array_equal(ckpt.fp32("f"), np.arange(4, dtype=np.float32).reshape(2, 2))
    assert ckpt.fp32("fbuf").dtype == np.float32 and ckpt.fp32("buf").dtype == np.int64
    for name in ckpt.param_shapes:
        assert np.array_equal(ckpt.fp32(name), truth["fp32"][name]), name
        exp_avg, exp_avg_sq = ckpt.moments(name)
        assert np.array_equal(exp_avg, truth["exp_avg"][name]), name
        assert np.array_equal(exp_avg_sq, truth["exp_avg_sq"][name]), name
    assert np.array_equal(ckpt.moments("tied.weight")[0], truth["exp_avg"]["a"])
    with pytest.raises(ValueError, match="no optimizer state"):
        ckpt.moments("f")
    with pytest.raises(KeyError, match="names()"):
        ckpt.fp32("nope")
