"""Tests for jds.config: DeepSpeed's ``ds_config.json`` accepted as written.

Where DeepSpeed 0.19 is installed the reference is DeepSpeed's own code, called without a
distributed init: the batch triad through ``DeepSpeedConfig._set_batch_related_parameters``
and ``_batch_assertion`` on a bare object, defaults through the signatures of FusedAdam,
FusedLamb, FusedLion and the lr_schedules classes and through DeepSpeed's pydantic section
models, and ``Config.to_dict()`` by parsing it with ``DeepSpeedConfig``. Hard-coded tables
(read from DeepSpeed's source) keep the same properties checked where DeepSpeed is missing.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import jds.config as jc
from jds.config import BatchSizes, Config, ConfigError, ConfigWarning

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "ds_config_example.json"

# Hugging Face's ZeRO-2 template (transformers docs, "DeepSpeed" page) with the scheduler
# switched to WarmupDecayLR: every "auto" the Trainer fills in, plus CPU optimizer offload.
HF_ZERO2: dict = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr":
                  "auto", "warmup_num_steps": "auto", "total_num_steps": 1000}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8,
                          "overlap_comm": True, "reduce_scatter": True,
                          "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


@pytest.fixture(scope="module")
def ds() -> SimpleNamespace:
    """DeepSpeed's reference pieces (CPU accelerator, no distributed init)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.ops.adam import FusedAdam
    from deepspeed.ops.lamb import FusedLamb
    from deepspeed.ops.lion import FusedLion
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return SimpleNamespace(
        DeepSpeedConfig=DeepSpeedConfig, lr_schedules=lr_schedules,
        optimizers={"adam": FusedAdam, "adamw": FusedAdam, "lamb": FusedLamb,
                    "lion": FusedLion},
        FP16=DeepSpeedFP16Config, BF16=DeepSpeedBF16Config, Zero=DeepSpeedZeroConfig)


def quiet_load(src) -> Config:
    """Config.load that fails the test on any ConfigWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        return Config.load(src)


def load_ignoring_warnings(src) -> Config:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return Config.load(src)


def load_error(src) -> ConfigError:
    """The ConfigError that Config.load raises on src (warnings ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        with pytest.raises(ConfigError) as info:
            Config.load(src)
    return info.value


def config_warnings(src) -> list[str]:
    """The ConfigWarning messages Config.load gives on src."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Config.load(src)
    return [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


def defaults_of(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


# --- loading ----------------------------------------------------------------------------------

def test_load_accepts_path_dict_config_and_none(tmp_path):
    d = {"train_batch_size": 16, "optimizer": {"type": "lion", "params": {"lr": 1e-4}}}
    (tmp_path / "ds.json").write_text(json.dumps(d))
    from_dict = quiet_load(d)
    assert from_dict.train_batch_size == 16 and from_dict.optimizer.params.lr == 1e-4
    assert quiet_load(str(tmp_path / "ds.json")) == from_dict
    assert quiet_load(tmp_path / "ds.json") == from_dict
    assert Config.load(from_dict) is from_dict
    assert quiet_load(None) == quiet_load({}) == Config()
    with pytest.raises(ConfigError, match="JSON file path, a dict or a jds.Config, got int"):
        Config.load(42)


def test_defaults():
    cfg = quiet_load(None)
    assert cfg.optimizer is None and cfg.scheduler is None  # engine: AdamW, constant lr
    assert cfg.gradient_clipping == 1.0  # DeepSpeed 0.19's GRADIENT_CLIPPING_DEFAULT
    assert (cfg.steps_per_print, cfg.seed, cfg.precision) == (10, 42, "fp32")
    assert cfg.zero_optimization.stage == 0 and cfg.zero_optimization.overlap_comm is False
    assert cfg.mesh.model_dump() == {"data": -1, "fsdp": 1, "tensor": 1, "stage": 1}
    assert (cfg.train.model, cfg.train.steps, cfg.train.remat) == ("llama-tiny", 300, "none")


def test_example_config_loads_without_warnings_and_resolves():
    cfg = quiet_load(EXAMPLE)
    assert cfg.optimizer.type == "adamw" and cfg.optimizer.params.betas == (0.9, 0.95)
    assert cfg.scheduler.type == "WarmupDecayLR" and cfg.scheduler.params.total_num_steps == 300
    assert cfg.zero_optimization.reduce_bucket_size == 200_000_000  # 2e8 read as an integer
    assert isinstance(cfg.zero_optimization.reduce_bucket_size, int)
    assert cfg.resolve_batch(8) == BatchSizes(32, 4, 1, 8)


def test_hugging_face_zero2_config_loads_with_warnings_not_errors():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = Config.load(HF_ZERO2)
    messages = "\n".join(str(w.message) for w in caught)
    assert all(issubclass(w.category, ConfigWarning) for w in caught)
    assert "zero_optimization.stage" not in messages  # ZeRO stages are implemented
    assert "offload_optimizer" not in messages  # CPU optimizer offload is implemented
    for key, default in [("optimizer.params.lr", "0.001"), ("gradient_clipping", "1.0"),
                         ("fp16.enabled", "false"), ("scheduler.params.warmup_max_lr", "0.001")]:
        assert f"{key}={default}" in messages
    assert "train_batch_size" not in messages  # batch "auto" means "not given": no warning
    assert cfg.precision == "fp32" and cfg.optimizer.params.lr == 1e-3
    assert cfg.zero_optimization.offload_optimizer.device == "cpu"
    with pytest.raises(ConfigError, match='"auto"'):
        cfg.resolve_batch(2)  # nothing filled the batch in
    filled = load_ignoring_warnings({**HF_ZERO2, "train_micro_batch_size_per_gpu": 4,
                                     "gradient_accumulation_steps": 8})
    assert filled.resolve_batch(2) == BatchSizes(64, 4, 8, 2)


@pytest.mark.parametrize("text, message", [
    ('{"train_batch_size": 8,', "is not valid JSON: Expecting property name enclosed in double "
                                "quotes at line 1 column 24"),
    ('{"optimizer": {"params": {"lr": 1, "lr": 2}}}', "key 'lr' appears twice in one object"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"gradient_clipping": "big"}', ': gradient_clipping="big": must be a number'),
], ids=["invalid-json", "duplicate-key", "not-an-object", "bad-value"])
def test_bad_file_names_the_file(tmp_path, text, message):
    path = tmp_path / "ds_config.json"
    path.write_text(text)
    err = str(load_error(path))
    assert err.startswith(f"config file '{path}'") and message in err


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"'{tmp_path / 'no.json'}' does not exist")):
        Config.load(tmp_path / "no.json")
    with pytest.raises(ConfigError, match=re.escape(f"'{tmp_path}' is not a file")):
        Config.load(tmp_path)


# --- the batch triad --------------------------------------------------------------------------

# (train_batch_size, micro_batch_per_gpu, gradient_accumulation_steps, dp) -> resolved triad or
# the start of the error; None = key not given. Read from DeepSpeed's _set_batch_related_parameters.
TRIAD_CASES = [
    ((32, 4, 2, 4), (32, 4, 2)), ((32, 4, None, 4), (32, 4, 2)), ((32, None, 2, 4), (32, 4, 2)),
    ((None, 4, 2, 4), (32, 4, 2)), ((32, None, None, 4), (32, 8, 1)),
    ((None, 4, None, 4), (16, 4, 1)), ((1, None, None, 1), (1, 1, 1)),
    ((32, 4, 2, 2), "train_batch_size=32 != train_micro_batch_size_per_gpu * "
                    "gradient_accumulation_steps * data-parallel devices = 4*2*2 = 16"),
    ((30, 4, None, 4), "train_batch_size=30 is not divisible by train_micro_batch_size_per_gpu"),
    ((8, 4, None, 4), "train_batch_size=8 is not divisible"),
    ((32, None, 3, 4), "train_batch_size=32 is not divisible by gradient_accumulation_steps"),
    ((30, None, None, 4), "train_batch_size=30 is not divisible by the data-parallel devices"),
    ((None, None, 2, 4), "no batch size: set train_batch_size or train_micro_batch_size_per_gpu"),
    ((None, None, None, 1), "no batch size"),
]


def ds_triad(DeepSpeedConfig, tb, mb, ga, dp):
    """DeepSpeed's own resolution of the triad, or None where its assertions fail."""
    ns = SimpleNamespace(train_batch_size=tb, train_micro_batch_size_per_gpu=mb,
                         gradient_accumulation_steps=ga, world_size=dp)
    try:
        DeepSpeedConfig._set_batch_related_parameters(ns)
        DeepSpeedConfig._batch_assertion(ns)
    except AssertionError:
        return None
    return ns.train_batch_size, ns.train_micro_batch_size_per_gpu, ns.gradient_accumulation_steps


def triad_cfg(tb, mb, ga, missing=None) -> Config:
    return quiet_load({k: missing if v is None else v for k, v in zip(
        ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"),
        (tb, mb, ga), strict=True)})


@pytest.mark.parametrize("missing", [None, "auto"], ids=["absent", "auto"])
@pytest.mark.parametrize("given, expected", TRIAD_CASES, ids=[str(c[0]) for c in TRIAD_CASES])
def test_resolve_batch_table(given, expected, missing):
    *triad, dp = given
    cfg = triad_cfg(*triad, missing=missing)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            cfg.resolve_batch(dp)
    else:
        got = cfg.resolve_batch(dp)
        assert got == BatchSizes(*expected, dp)
        assert got.micro_batch_global == expected[1] * dp


def test_resolve_batch_matches_deepspeed_on_a_grid(ds):
    for (*triad, dp), expected in TRIAD_CASES:  # the table above is DeepSpeed's
        want = None if isinstance(expected, str) else expected
        assert ds_triad(ds.DeepSpeedConfig, *triad, dp) == want, (triad, dp)
    mismatches = []
    for tb, mb, ga in itertools.product((None, 1, 6, 8, 12, 16, 24, 32, 48), (None, 1, 2, 3, 4, 8),
                                        (None, 1, 2, 3, 4)):
        cfg = triad_cfg(tb, mb, ga)
        for dp in (1, 2, 3, 4, 8):
            want = ds_triad(ds.DeepSpeedConfig, tb, mb, ga, dp)
            try:
                b = cfg.resolve_batch(dp)
                got = (b.train_batch_size, b.micro_batch_per_device, b.gradient_accumulation_steps)
            except ConfigError:
                got = None
            if got != want:
                mismatches.append(((tb, mb, ga, dp), got, want))
    assert not mismatches, mismatches[:10]


def test_resolve_batch_errors_suggest_a_fix():
    with pytest.raises(ConfigError, match="set train_batch_size to 16, or drop one"):
        triad_cfg(32, 4, 2).resolve_batch(2)
    with pytest.raises(ConfigError, match="use train_batch_size 16 or 32$"):
        triad_cfg(30, 4, None).resolve_batch(4)
    with pytest.raises(ConfigError, match=r'train_batch_size, train_micro_batch_size_per_gpu, '
                                          r'gradient_accumulation_steps are "auto"'):
        triad_cfg("auto", "auto", "auto").resolve_batch(1)


@pytest.mark.parametrize("dp", [0, -2, 1.0, True, "2"])
def test_resolve_batch_rejects_bad_dp(dp):
    with pytest.raises(ConfigError, match="dp_size must be a positive integer"):
        triad_cfg(8, None, None).resolve_batch(dp)


@pytest.mark.parametrize("key", ["train_batch_size", "train_micro_batch_size_per_gpu",
                                 "gradient_accumulation_steps"])
@pytest.mark.parametrize("value", [0, -4, 2.5, 8.0, "8", True, [8]])
def test_batch_keys_reject_non_positive_integers(key, value):
    msg = str(load_error({key: value}))
    assert msg == f'{key}={json.dumps(value)}: must be a positive integer, "auto" or null'


# --- optimizers -------------------------------------------------------------------------------

OPTIMIZER_DEFAULTS = {  # FusedAdam / FusedLamb / FusedLion keyword defaults (DeepSpeed 0.19)
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
             "adam_w_mode": True, "bias_correction": True, "amsgrad": False},
    "lamb": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
             "eps_inside_sqrt": False, "bias_correction": True, "max_coeff": 10.0,
             "min_coeff": 0.01, "amsgrad": False},
    "lion": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0},
}
OPTIMIZER_DEFAULTS["adamw"] = OPTIMIZER_DEFAULTS["adam"]
PARAMS_CLASS = {"adam": jc.AdamParams, "adamw": jc.AdamParams, "lamb": jc.LambParams,
                "lion": jc.LionParams}


@pytest.mark.parametrize("name", ["Adam", "ADAMW", "adamw", "Lamb", "LAMB", "Lion", "lion"])
def test_optimizer_type_is_case_insensitive_with_defaults(name):
    opt = quiet_load({"optimizer": {"type": name}}).optimizer
    kind = name.lower()
    assert opt.type == kind and type(opt.params) is PARAMS_CLASS[kind]
    dumped = opt.params.model_dump()
    assert {k: dumped[k] for k in OPTIMIZER_DEFAULTS[kind]} == OPTIMIZER_DEFAULTS[kind]


@pytest.mark.parametrize("kind", ["adam", "adamw", "lamb", "lion"])
def test_optimizer_defaults_match_deepspeed_signatures(ds, kind):
    ds_defaults = defaults_of(ds.optimizers[kind].__init__)
    ds_defaults.pop("max_grad_norm", None)  # DeepSpeed's engine refuses it; jds too (below)
    jds = quiet_load({"optimizer": {"type": kind}}).optimizer.params.model_dump()
    assert {k: jds[k] for k in ds_defaults} == ds_defaults


def test_adam_defaults_match_torch():
    torch = pytest.importorskip("torch")
    torch_adam = defaults_of(torch.optim.Adam.__init__)
    jds = jc.AdamParams().model_dump()
    assert {k: jds[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
        k: torch_adam[k] for k in ("lr", "betas", "eps", "weight_decay")}


@pytest.mark.parametrize("kind, given, expected", [
    ("adam", None, True), ("adam", False, False), ("adam", True, True),
    ("adamw", None, True), ("adamw", False, True),  # DeepSpeed: type AdamW forces adam_w_mode
])
def test_adam_w_mode(kind, given, expected):
    params = {} if given is None else {"adam_w_mode": given}
    cfg = quiet_load({"optimizer": {"type": kind, "params": params}})
    assert cfg.optimizer.params.adam_w_mode is expected


def test_optimizer_params_are_kept():
    params = {"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.05,
              "max_coeff": 5.0, "min_coeff": 0.1, "eps_inside_sqrt": True}
    cfg = quiet_load({"optimizer": {"type": "Lamb", "params": params}})
    assert cfg.optimizer.params.model_dump(exclude_none=True) == {
        **params, "betas": (0.8, 0.9), "bias_correction": True, "amsgrad": False}


@pytest.mark.parametrize("optimizer, message", [
    ({"type": "sgdx"}, 'optimizer.type="sgdx": unknown optimizer; allowed: adam, adamw, lamb, '
                       "lion"),
    ({"type": "OneBitAdam"}, "DeepSpeed's OneBitAdam is not supported by jds yet; use one of adam"),
    ({"type": 3}, "optimizer.type=3: must be a string, one of adam, adamw, lamb, lion"),
    ({}, "optimizer.type: required key is missing"),
    ({"type": "lion", "params": {"eps": 1e-8}}, "optimizer.params.eps=1e-08: unknown key"),
    ({"type": "lamb", "params": {"adam_w_mode": True}}, "optimizer.params.adam_w_mode=true: "
                                                        "unknown key"),
    ({"type": "adam", "params": {"amsgrad": True}}, "AMSGrad is not supported"),
    ({"type": "lamb", "params": {"max_grad_norm": 1.0}}, "use the top-level 'gradient_clipping'"),
    ({"type": "adam", "params": [1e-3]}, "optimizer.params=[0.001]: must be an object"),
], ids=["unknown", "deepspeed-only", "not-a-string", "no-type", "lion-eps", "lamb-adam-key",
        "amsgrad", "lamb-max-grad-norm", "params-list"])
def test_optimizer_errors(optimizer, message):
    assert message in str(load_error({"optimizer": optimizer}))


# --- schedulers -------------------------------------------------------------------------------

REQUIRED = {"WarmupLR": {}, "WarmupDecayLR": {"total_num_steps": 500},
            "WarmupCosineLR": {"total_num_steps": 500},
            "OneCycle": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}, "LRRangeTest": {}}
SCHEDULER_DEFAULTS = {  # lr_schedules.py keyword defaults (DeepSpeed 0.19)
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000,
                 "warmup_type": "log", "last_batch_iteration": -1},
    "WarmupDecayLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000,
                      "warmup_type": "log", "last_batch_iteration": -1},
    "WarmupCosineLR": {"warmup_min_ratio": 0.0, "warmup_num_steps": 1000, "cos_min_ratio": 1e-4,
                       "warmup_type": "log", "last_batch_iteration": -1},
    "OneCycle": {"decay_lr_rate": 0.0, "cycle_first_step_size": 2000,
                 "cycle_second_step_size": None, "cycle_first_stair_count": 0,
                 "cycle_second_stair_count": None, "decay_step_size": 0, "cycle_momentum": True,
                 "cycle_min_mom": 0.8, "cycle_max_mom": 0.9, "decay_mom_rate": 0.0,
                 "last_batch_iteration": -1},
    "LRRangeTest": {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 2000,
                    "lr_range_test_step_rate": 1.0, "lr_range_test_staircase": False,
                    "last_batch_iteration": -1},
}
# One non-default value per DeepSpeed parameter (DeepSpeed's docs spell them this way).
WARMUP = {"warmup_min_lr": 1e-5, "warmup_max_lr": 3e-4, "warmup_num_steps": 50,
          "warmup_type": "linear", "last_batch_iteration": 9}
SCHEDULER_EXAMPLES = {
    "WarmupLR": WARMUP, "WarmupDecayLR": {**WARMUP, "total_num_steps": 800},
    "WarmupCosineLR": {"total_num_steps": 800, "warmup_min_ratio": 0.1, "warmup_num_steps": 50,
                       "cos_min_ratio": 0.01, "warmup_type": "linear", "last_batch_iteration": 9},
    "OneCycle": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "decay_lr_rate": 0.01,
                 "cycle_first_step_size": 100, "cycle_second_step_size": 50,
                 "cycle_first_stair_count": 2, "cycle_second_stair_count": 3,
                 "decay_step_size": 10, "cycle_momentum": False, "cycle_min_mom": 0.85,
                 "cycle_max_mom": 0.95, "decay_mom_rate": 0.001, "last_batch_iteration": 9},
    "LRRangeTest": {"lr_range_test_min_lr": 1e-5, "lr_range_test_step_size": 10,
                    "lr_range_test_step_rate": 2.0, "lr_range_test_staircase": True,
                    "last_batch_iteration": 9},
}


@pytest.mark.parametrize("name", list(jc.SCHEDULER_PARAMS))
def test_scheduler_defaults(name):
    sched = quiet_load({"scheduler": {"type": name.upper(), "params": REQUIRED[name]}}).scheduler
    assert sched.type == name and type(sched.params) is jc.SCHEDULER_PARAMS[name]
    assert sched.params.model_dump() == {**SCHEDULER_DEFAULTS[name], **REQUIRED[name]}


@pytest.mark.parametrize("name", list(jc.SCHEDULER_PARAMS))
def test_scheduler_defaults_match_deepspeed_signatures(ds, name):
    ds_defaults = defaults_of(getattr(ds.lr_schedules, name).__init__)
    assert ds_defaults == SCHEDULER_DEFAULTS[name]
    params = quiet_load({"scheduler": {"type": name, "params": REQUIRED[name]}}).scheduler.params
    assert set(params.model_dump()) == set(inspect.signature(
        getattr(ds.lr_schedules, name).__init__).parameters) - {"self", "optimizer"}


@pytest.mark.parametrize("name", list(jc.SCHEDULER_PARAMS))
def test_scheduler_params_are_kept(name):
    sched = quiet_load({"scheduler": {"type": name, "params": SCHEDULER_EXAMPLES[name]}}).scheduler
    assert sched.params.model_dump() == SCHEDULER_EXAMPLES[name]


@pytest.mark.parametrize("scheduler, message", [
    ({"type": "CosineAnnealing"}, 'scheduler.type="CosineAnnealing": unknown scheduler; allowed: '
                                  "WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest"),
    ({"type": "WarmupDecayLR"}, "scheduler.params.total_num_steps: required key is missing"),
    ({"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}},
     'scheduler.params.total_num_steps="auto": nothing resolves "auto" here'),
    ({"type": "WarmupLR", "params": {"total_num_steps": 10}},
     "scheduler.params.total_num_steps=10: unknown key"),
    ({"type": "WarmupLR", "params": {"warmup_type": "cosine"}},
     "scheduler.params.warmup_type=\"cosine\": Input should be 'log' or 'linear'"),
    ({"type": "WarmupLR", "params": {"warmup_num_steps": 0}},
     "scheduler.params.warmup_num_steps=0: Input should be greater than 0"),
], ids=["unknown", "missing-required", "auto-required", "other-schedulers-key", "warmup-type",
        "zero-warmup"])
def test_scheduler_errors(scheduler, message):
    assert message in str(load_error({"scheduler": scheduler}))


# --- wrong types and values: one ConfigError naming key, value and what is allowed -----------

BAD_VALUES = [
    ({"gradient_clipping": "big"}, 'gradient_clipping="big": must be a number'),
    ({"gradient_clipping": -1.0}, "gradient_clipping=-1.0: Input should be greater than or "
                                  "equal to 0"),
    ({"fp16": {"initial_scale_power": -1}}, "fp16.initial_scale_power=-1: Input should be "
                                            "greater than or equal to 0"),
    ({"fp16": {"min_loss_scale": float("nan")}}, "fp16.min_loss_scale=NaN: must be a finite"),
    ({"fp16": {"enabled": "yes"}}, 'fp16.enabled="yes": Input should be a valid boolean'),
    ({"bf16": {"enabled": 1}}, "bf16.enabled=1: Input should be a valid boolean"),
    ({"fp16": {"enable": True}}, "fp16.enable=true: unknown key; did you mean 'enabled'?"),
    ({"optimizer": {"type": "sgdx"}}, 'optimizer.type="sgdx": unknown optimizer; allowed: '
                                      "adam, adamw, lamb, lion"),
    ({"optimizer": {"type": "adam", "params": {"lr": "fast"}}},
     'optimizer.params.lr="fast": must be a number'),
    ({"optimizer": {"type": "adam", "params": {"lrr": 0.1}}},
     "optimizer.params.lrr=0.1: unknown key; did you mean 'lr'? allowed: lr, betas"),
    ({"optimizer": {"type": "adam", "params": {"betas": [0.9]}}},
     "optimizer.params.betas=[0.9]: too few items"),
    ({"optimizer": {"type": "adam", "params": {"betas": [0.9, "x"]}}},
     'optimizer.params.betas[1]="x": must be a number'),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage=7: Input should be less "
                                          "than or equal to 3"),
    ({"zero_optimization": {"stage": "2"}}, 'zero_optimization.stage="2": must be an integer'),
    ({"zero_optimization": {"reduce_bucket_size": 0}}, "zero_optimization.reduce_bucket_size=0: "
                                                       "Input should be greater than 0"),
    ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
     "zero_optimization.offload_optimizer.device=\"gpu\": Input should be 'none', 'cpu' or "
     "'nvme'"),
    ({"zero_optimization": {"compute_grad_norm": False}},
     "zero_optimization.compute_grad_norm=false needs stage 1 or 2, got stage=0"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
     "zero_optimization.offload_optimizer.ratio=0.5: partial offload needs stage 3"),
    ({"fp16": {"enabled": True, "loss_scale_window": 0}},
     "fp16.loss_scale_window=0: must be > 0 with dynamic loss scaling (fp16.loss_scale=0)"),
    ({"mesh": {"data": 0}}, "mesh.data=0: must be a positive size or -1 (fill)"),
    ({"mesh": {"data": -1, "tensor": -1}}, "mesh.data, mesh.tensor are all -1; only one axis"),
    ({"train": {"remat": "some"}}, "train.remat=\"some\": Input should be 'none', 'full' or "
                                   "'dots'"),
    ({"steps_per_print": 0}, "steps_per_print=0: Input should be greater than 0"),
    ({"seed": "42"}, 'seed="42": must be an integer'),
]


@pytest.mark.parametrize("config, message", BAD_VALUES,
                         ids=[m.split("=")[0].split(":")[0][:40] for _, m in BAD_VALUES])
def test_bad_value_is_one_readable_error(config, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            Config.load(config)
        with pytest.raises(ConfigError, match=re.escape(message)):
            Config(**config)  # direct construction applies the same rules
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and info.value.__cause__ is None
    assert "\n" not in msg and "problems" not in msg  # exactly one problem reported
    for pydantic_noise in ("validation error", "errors.pydantic.dev", "For further information",
                           "input_value", "[type="):
        assert pydantic_noise not in msg


def test_several_problems_are_one_error_with_a_line_each():
    msg = str(load_error({"gradient_clipping": "big", "fp16": {"initial_scale_power": -1},
                          "mesh": {"data": 0}}))
    lines = msg.splitlines()
    assert lines[0] == "3 problems in the config:"
    assert [line.split("=")[0].strip() for line in lines[1:]] == [
        "gradient_clipping", "fp16.initial_scale_power", "mesh.data"]
    assert str(load_error({"scheduler": {"type": "OneCycle"}})).splitlines() == [
        "2 problems in the config:", "  scheduler.params.cycle_min_lr: required key is missing",
        "  scheduler.params.cycle_max_lr: required key is missing"]


# --- precision --------------------------------------------------------------------------------

@pytest.mark.parametrize("config, precision", [
    ({}, "fp32"), ({"fp16": {"enabled": True}}, "fp16"), ({"bf16": {"enabled": True}}, "bf16"),
    ({"bfloat16": {"enabled": True}}, "bf16"), ({"fp16": {"enabled": False}}, "fp32"),
])
def test_precision(config, precision):
    assert quiet_load(config).precision == precision


def test_fp16_and_bf16_together_is_an_error():
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled are both true"):
        Config.load({"fp16": {"enabled": True}, "bfloat16": {"enabled": True}})


def test_bf16_wins_over_bfloat16_with_a_warning():
    with pytest.warns(ConfigWarning, match="bfloat16 \\(bf16 is given"):
        cfg = Config.load({"bf16": {"enabled": False}, "bfloat16": {"enabled": True}})
    assert cfg.precision == "fp32"


def test_fp16_dynamic_scaling_needs_positive_window_and_floor():
    with pytest.raises(ConfigError, match="fp16.min_loss_scale=0.0: must be > 0"):
        Config.load({"fp16": {"enabled": True, "min_loss_scale": 0}})
    static = quiet_load({"fp16": {"enabled": True, "loss_scale": 128, "loss_scale_window": 0}})
    assert static.fp16.loss_scale == 128.0


def test_precision_defaults_match_deepspeed(ds):
    cfg = quiet_load(None)
    assert cfg.fp16.model_dump() == ds.FP16().model_dump()
    assert cfg.bf16.model_dump() == ds.BF16().model_dump()


# --- zero_optimization ------------------------------------------------------------------------

def test_zero_defaults_match_deepspeed(ds):
    want = ds.Zero().model_dump(by_alias=True, mode="json")
    got = quiet_load(None).zero_optimization.model_dump(mode="json")
    want.pop("leaf_module")  # DeepSpeed's default names torch MoE classes; jds has none
    assert {k: got[k] for k in want} == want
    assert set(got) - set(want) == {"mics_shard_size", "mics_hierarchical_params_gather",
                                    "zeropp_loco_param", "leaf_module", "param_partition_size",
                                    "grad_partition_size", "optimizer_partition_size"}


def test_zero_section_deepspeed_spellings():
    zero = quiet_load({"zero_optimization": {
        "stage": 3, "prefetch_bucket_size": 1e7, "stage3_max_live_parameters": 3e8,
        "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"}}}).zero_optimization
    assert zero.stage3_prefetch_bucket_size == 10_000_000  # DeepSpeed's short alias
    assert zero.stage3_max_live_parameters == 300_000_000
    assert zero.overlap_comm is True  # DeepSpeed: unset overlap_comm = (stage == 3)
    assert zero.offload_param.device == "nvme"
    assert quiet_load({"zero_optimization": True}).zero_optimization.stage == 1


# --- warnings: unknown keys, keys not implemented yet, "auto" ---------------------------------

def test_unknown_keys_are_one_warning_listing_them():
    got = config_warnings({"optimzer": {"type": "adam"}, "my_key": 1, "train_batch_size": 8})
    assert got == ["ignoring unknown config keys: 'optimzer' (did you mean 'optimizer'?), "
                   "'my_key'"]


TOP_LEVEL_NOT_IMPLEMENTED = [k for k in jc.NOT_IMPLEMENTED if "." not in k]


@pytest.mark.parametrize("key", TOP_LEVEL_NOT_IMPLEMENTED)
def test_not_implemented_top_level_key_warns_when_on(key):
    got = config_warnings({key: {"enabled": True}})
    assert len(got) == 1 and f"{key} ({jc.NOT_IMPLEMENTED[key]})" in got[0]
    assert got[0].startswith("accepted but not implemented by jds yet")


@pytest.mark.parametrize("value", [False, None, {}, {"enabled": False}])
@pytest.mark.parametrize("key", ["comms_logger", "wall_clock_breakdown", "tensorboard"])
def test_not_implemented_key_switched_off_is_silent(key, value):
    quiet_load({key: value})


@pytest.mark.parametrize("key, default, other", [
    ("gradient_predivide_factor", 1.0, 2.0), ("sequence_parallel_size", 1, 4),
    ("gradient_allreduce_op", "mean", "sum"),
])
def test_not_implemented_key_at_deepspeeds_default_is_silent(key, default, other):
    quiet_load({key: default})
    assert f"{key} (" in config_warnings({key: other})[0]


@pytest.mark.parametrize("section, shown", [
    ({"zero_optimization": {"zero_quantized_weights": True}},
     "zero_optimization.zero_quantized_weights=true"),
    ({"fp16": {"fp16_master_weights_and_grads": True}}, "fp16.fp16_master_weights_and_grads=true"),
    ({"bf16": {"bf16_optimizer_states": True}}, "bf16.bf16_optimizer_states=true"),
])
def test_not_implemented_nested_key_warns_once(section, shown):
    got = config_warnings(section)
    assert len(got) == 1 and shown in got[0]


@pytest.mark.parametrize("zero", [{"stage": 0}, {"stage": 3, "zero_hpz_partition_size": 8},
                                  {"stage": 1, "mics_shard_size": 4},
                                  {"grad_partition_size": 4},
                                  {"offload_optimizer": {"device": "none"}},
                                  {"offload_optimizer": {"device": "cpu"}},
                                  {"offload_optimizer": {"device": "nvme", "nvme_path": "/nvme",
                                                         "buffer_count": 8}},
                                  {"stage": 2, "cpu_offload": True},
                                  {"stage": 3, "offload_param": {"device": "cpu"}},
                                  {"stage": 3, "offload_optimizer": {"device": "cpu",
                                                                     "ratio": 0.3}},
                                  {"reduce_bucket_size": 1e6, "overlap_comm": True}])
def test_nested_keys_at_default_are_silent(zero):
    quiet_load({"zero_optimization": zero})


def test_auto_outside_the_batch_falls_back_with_one_warning():
    with pytest.warns(ConfigWarning) as record:
        cfg = Config.load({"gradient_clipping": "auto", "train_batch_size": "auto",
                           "optimizer": {"type": "adamw", "params": {"lr": "auto", "eps": 1e-6}}})
    assert [str(w.message) for w in record] == [
        '"auto" values fall back to their defaults, as in DeepSpeed: gradient_clipping=1.0, '
        "optimizer.params.lr=0.001"]
    assert record[0].filename == __file__  # points at the caller, not at jds or pydantic
    assert (cfg.gradient_clipping, cfg.optimizer.params.lr, cfg.optimizer.params.eps) == (
        1.0, 1e-3, 1e-6)


def test_direct_construction_warns_once():
    with pytest.warns(ConfigWarning) as record:
        Config(zero_optimization={"stage": 1, "zero_quantized_weights": True}, my_key=1)
    assert len(record) == 2  # one for the unknown key, one for ZeRO++; no repeats


# --- to_dict, default_train, DeepSpeed reads what jds writes ----------------------------------

ROUND_TRIP = {
    "default": {}, "default-train": jc.DEFAULT_TRAIN, "example": json.loads(EXAMPLE.read_text()),
    "hf-zero2": {**HF_ZERO2, "train_batch_size": 64},
    "fp16-lamb-onecycle": {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
        "fp16": {"enabled": True, "loss_scale": 0, "hysteresis": 4, "consecutive_hysteresis": True},
        "optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "max_coeff": 3.0}},
        "scheduler": {"type": "OneCycle", "params": SCHEDULER_EXAMPLES["OneCycle"]},
        "gradient_clipping": 0.5, "steps_per_print": 5},
    "bf16-lion-cosine": {
        "train_batch_size": 48, "bf16": {"enabled": True},
        "optimizer": {"type": "lion", "params": {"lr": 1e-4, "betas": [0.95, 0.98]}},
        "scheduler": {"type": "WarmupCosineLR", "params": SCHEDULER_EXAMPLES["WarmupCosineLR"]},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
    "adam-l2-rangetest": {
        "train_batch_size": 16, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "adam", "params": {"adam_w_mode": False, "weight_decay": 0.01}},
        "scheduler": {"type": "LRRangeTest", "params": SCHEDULER_EXAMPLES["LRRangeTest"]}},
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_to_dict_round_trips(name):
    cfg = load_ignoring_warnings(ROUND_TRIP[name])
    out = cfg.to_dict()
    again = load_ignoring_warnings(json.loads(json.dumps(out)))
    assert again == cfg and again.to_dict() == out


@pytest.mark.parametrize("name", [n for n in ROUND_TRIP if n != "default"])
def test_deepspeed_reads_to_dict_as_jds_does(ds, name):
    cfg = load_ignoring_warnings(ROUND_TRIP[name])
    # "auto" is Hugging Face's to fill in; DeepSpeed reads an absent batch key as not given
    d = ds.DeepSpeedConfig({k: v for k, v in cfg.to_dict().items() if v != "auto"})
    b = cfg.resolve_batch(d.world_size)
    assert (d.train_batch_size, d.train_micro_batch_size_per_gpu,
            d.gradient_accumulation_steps) == (b.train_batch_size, b.micro_batch_per_device,
                                               b.gradient_accumulation_steps)
    assert d.optimizer_name == cfg.optimizer.type
    assert d.optimizer_params == cfg.to_dict()["optimizer"]["params"]
    assert d.scheduler_name == cfg.scheduler.type
    assert d.scheduler_params == cfg.scheduler.params.model_dump(mode="json")
    assert d.gradient_clipping == cfg.gradient_clipping
    assert d.steps_per_print == cfg.steps_per_print
    assert d.float16_config.model_dump() == cfg.fp16.model_dump()
    assert d.bfloat16_config.enabled == cfg.bf16.enabled
    assert d.zero_optimization_stage == cfg.zero_optimization.stage


def test_default_train():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cfg = Config.default_train()
    assert cfg.resolve_batch(8) == BatchSizes(32, 4, 1, 8)
    assert cfg.precision == "fp32" and cfg.gradient_clipping == 1.0
    assert cfg.optimizer.type == "adamw"
    assert cfg.optimizer.params.model_dump(include={"lr", "betas", "weight_decay", "eps"}) == {
        "lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1, "eps": 1e-8}
    assert cfg.scheduler.type == "WarmupDecayLR"
    assert cfg.scheduler.params.model_dump() == {
        "warmup_min_lr": 0.0, "warmup_max_lr": 3e-3, "warmup_num_steps": 30,
        "total_num_steps": 300, "warmup_type": "linear", "last_batch_iteration": -1}
    assert cfg.scheduler.params.total_num_steps == cfg.train.steps


# --- activation_checkpointing -> Config.remat ------------------------------------------------

# DeepSpeed 0.19's defaults (runtime/activation_checkpointing/config.py, ACT_CHKPT_DEFAULT)
ACT_CHKPT_DEFAULTS = {"partition_activations": False, "contiguous_memory_optimization": False,
                      "cpu_checkpointing": False, "number_checkpoints": None,
                      "synchronize_checkpoint_boundary": False, "profile": False}
# Hugging Face's templates write the section out in full, every switch off
HF_ACT_CHKPT = {**ACT_CHKPT_DEFAULTS}


def test_activation_checkpointing_defaults_are_deepspeeds():
    section = jc.ActivationCheckpointingConfig()
    assert section.model_dump(exclude={"policy"}) == ACT_CHKPT_DEFAULTS
    assert section.policy is None and section.mode == "full"


def test_activation_checkpointing_defaults_match_deepspeed(ds):
    from deepspeed.runtime.activation_checkpointing import config as ds_act

    assert ds_act.ACT_CHKPT_DEFAULT == ACT_CHKPT_DEFAULTS


@pytest.mark.parametrize("config, remat", [
    ({}, "none"),
    ({"train": {"remat": "dots"}}, "dots"),
    ({"activation_checkpointing": None}, "none"),
    ({"activation_checkpointing": {}}, "full"),
    ({"activation_checkpointing": HF_ACT_CHKPT}, "full"),
    ({"activation_checkpointing": {"cpu_checkpointing": True}}, "offload"),
    ({"activation_checkpointing": {"cpu_checkpointing": True, "policy": "offload"}}, "offload"),
    ({"activation_checkpointing": {"policy": "offload"}}, "offload"),
    ({"activation_checkpointing": {"policy": "dots"}}, "dots"),
    ({"activation_checkpointing": {"policy": "none"}}, "none"),
    ({"activation_checkpointing": {"partition_activations": True,
                                   "contiguous_memory_optimization": True,
                                   "number_checkpoints": 24, "profile": True,
                                   "synchronize_checkpoint_boundary": True}}, "full"),
    ({"train": {"remat": "full"}, "activation_checkpointing": {}}, "full"),  # they agree
    ({"train": {"remat": "dots"}, "activation_checkpointing": {"policy": "dots"}}, "dots"),
    ({"train": {"remat": "none"}, "activation_checkpointing": {}}, "full"),  # the default yields
])
def test_activation_checkpointing_resolves_config_remat(config, remat):
    import jds.models as M

    cfg = quiet_load(config)  # every DeepSpeed key accepted without a warning
    assert cfg.remat == remat and cfg.remat in M.REMAT_MODES


def test_activation_checkpointing_policies_are_the_models_remat_modes():
    import typing

    import jds.models as M

    field = jc.ActivationCheckpointingConfig.model_fields["policy"]
    assert set(typing.get_args(typing.get_args(field.annotation)[0])) == set(M.REMAT_MODES)
    assert "activation_checkpointing" not in jc.NOT_IMPLEMENTED


@pytest.mark.parametrize("config, message", [
    ({"train": {"remat": "dots"}, "activation_checkpointing": {}},
     'train.remat="dots" and activation_checkpointing (remat "full") disagree; keep one of '
     'them, or set activation_checkpointing.policy to "dots"'),
    ({"train": {"remat": "full"}, "activation_checkpointing": {"cpu_checkpointing": True}},
     'train.remat="full" and activation_checkpointing (remat "offload") disagree'),
    ({"activation_checkpointing": {"cpu_checkpointing": True, "policy": "full"}},
     'activation_checkpointing.cpu_checkpointing=true asks for policy "offload" but '
     'activation_checkpointing.policy="full"; drop one of the two keys'),
    ({"activation_checkpointing": {"contiguous_memory_optimization": True,
                                   "number_checkpoints": 4}},
     "activation_checkpointing.contiguous_memory_optimization=true needs "
     "activation_checkpointing.partition_activations=true, as in DeepSpeed"),
    ({"activation_checkpointing": {"contiguous_memory_optimization": True,
                                   "partition_activations": True}},
     "contiguous_memory_optimization=true needs activation_checkpointing.number_checkpoints"),
    ({"activation_checkpointing": {"partitioned_activations": True}},
     "activation_checkpointing.partitioned_activations=true: unknown key; did you mean "
     "'partition_activations'?"),
    ({"activation_checkpointing": {"policy": "offload_all"}},
     "activation_checkpointing.policy=\"offload_all\": Input should be 'none', 'full', "
     "'dots' or 'offload'"),
    ({"activation_checkpointing": {"cpu_checkpointing": 1}},
     "activation_checkpointing.cpu_checkpointing=1: Input should be a valid boolean"),
    ({"activation_checkpointing": {"number_checkpoints": 0}},
     "activation_checkpointing.number_checkpoints=0: Input should be greater than or equal"),
    ({"activation_checkpointing": True}, "activation_checkpointing=true: Input should be a "
                                         "valid dictionary"),
])
def test_activation_checkpointing_errors_name_the_keys(config, message):
    assert message in str(load_error(config))


@pytest.mark.parametrize("section", [
    {}, {"cpu_checkpointing": True}, {"policy": "dots"},
    {"partition_activations": True, "contiguous_memory_optimization": True,
     "number_checkpoints": 8, "synchronize_checkpoint_boundary": True, "profile": True},
])
def test_activation_checkpointing_round_trips_and_deepspeed_reads_it(ds, section):
    cfg = quiet_load({"train_batch_size": 8, "activation_checkpointing": section})
    out = cfg.to_dict()
    again = quiet_load(json.loads(json.dumps(out)))
    assert again == cfg and again.remat == cfg.remat and again.to_dict() == out
    # DeepSpeed reads a null optimizer/scheduler as a section and fails; jds's means "default"
    d = ds.DeepSpeedConfig({k: v for k, v in out.items() if v is not None})
    d = d.activation_checkpointing_config
    assert {k: getattr(d, k) for k in ACT_CHKPT_DEFAULTS} == cfg.activation_checkpointing \
        .model_dump(exclude={"policy"})


def test_config_without_the_section_writes_none_deepspeed_would_misread(ds):
    out = quiet_load({"train_batch_size": 8}).to_dict()
    assert "activation_checkpointing" not in out  # DeepSpeed fails on a null section
    d = ds.DeepSpeedConfig({k: v for k, v in out.items() if v is not None})
    d = d.activation_checkpointing_config
    assert {k: getattr(d, k) for k in ACT_CHKPT_DEFAULTS} == ACT_CHKPT_DEFAULTS
