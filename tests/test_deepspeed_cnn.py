"""A user's model against real DeepSpeed: the tutorial CNN with a cross-entropy ``loss_fn``.

The fixture (``scripts/make_deepspeed_cnn_reference.py``) holds the CNN's initial weights
(torch), 12 global batches of CIFAR-shaped images, and one DeepSpeed run per ZeRO stage
(2 CPU ranks, fp32, AdamW with weight decay, WarmupLR, clipping 0.47 that triggers on half
the steps, gradient accumulation 2). jds trains the examples' ``Net`` from the same
weights, batches and ``ds_config`` on 2 devices and must give DeepSpeed's per-step losses
(<= 1e-4), grad norms and final parameters; under ZeRO-3 each device holds half the
parameter bytes.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from test_user_models import cifar

import jds

FIXTURE = Path(__file__).parent / "fixtures" / "ds_cnn_reference"
CONFIG_FILE = {0: "ds_config.json", 1: "ds_config_zero1.json", 2: "ds_config_zero2.json",
               3: "ds_config_zero3.json"}
REFERENCE_FILE = {0: "reference.json", 1: "reference_zero1.json", 2: "reference_zero2.json",
                  3: "reference_zero3.json"}
LOSS_ATOL = 1e-4
GRAD_NORM_RTOL = 1e-4
CHECKSUM_ATOL = 1e-3  # one missed or doubled update moves a checksum by ~1e-2


def torch_to_jds(w: dict[str, np.ndarray]) -> dict:
    """The torch ``Net``'s weights in the NNX ``Net``'s layout (NHWC convs, [in, out]
    linears; fc1's inputs reordered from torch's (C, H, W) flatten to NHWC's (H, W, C))."""
    fc1 = w["fc1.weight"].reshape(120, 16, 5, 5).transpose(2, 3, 1, 0).reshape(400, 120)
    return {
        "conv1": {"kernel": w["conv1.weight"].transpose(2, 3, 1, 0), "bias": w["conv1.bias"]},
        "conv2": {"kernel": w["conv2.weight"].transpose(2, 3, 1, 0), "bias": w["conv2.bias"]},
        "fc1": {"kernel": fc1, "bias": w["fc1.bias"]},
        "fc2": {"kernel": w["fc2.weight"].T, "bias": w["fc2.bias"]},
        "fc3": {"kernel": w["fc3.weight"].T, "bias": w["fc3.bias"]},
    }


def jds_to_torch_checksums(params: dict) -> dict[str, tuple[float, float]]:
    def c(x):
        x = np.asarray(x, np.float64)
        return float(x.sum()), float((x * x).sum())
    return {f"{m}.{'weight' if k == 'kernel' else 'bias'}": c(v)
            for m, d in params.items() for k, v in d.items()}


def make_net() -> cifar.Net:
    net = cifar.Net(nnx.Rngs(0))
    weights = torch_to_jds(load_file(str(FIXTURE / "model.safetensors")))
    nnx.update(net, jax.tree.map(jnp.asarray, weights))
    return net


def test_fixture_is_small_and_complete():
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 1.5 * 1024 * 1024
    ref = json.loads((FIXTURE / "reference.json").read_text())
    clipped = [s["clipped"] for s in ref["steps"]]
    assert len(clipped) == 12 and any(clipped) and not all(clipped)


def test_the_nnx_net_is_the_torch_net():
    """Same weights, same image: the same logits (the layout conversion is right)."""
    torch = pytest.importorskip("torch")
    w = load_file(str(FIXTURE / "model.safetensors"))
    x = cifar.normalise(np.load(FIXTURE / "batches.npz")["images"][0])
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    h = torch.from_numpy(x).permute(0, 3, 1, 2)
    F = torch.nn.functional
    h = F.max_pool2d(F.relu(F.conv2d(h, t["conv1.weight"], t["conv1.bias"])), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, t["conv2.weight"], t["conv2.bias"])), 2)
    h = torch.flatten(h, 1)
    h = F.relu(F.linear(h, t["fc1.weight"], t["fc1.bias"]))
    h = F.relu(F.linear(h, t["fc2.weight"], t["fc2.bias"]))
    want = F.linear(h, t["fc3.weight"], t["fc3.bias"]).numpy()
    np.testing.assert_allclose(np.asarray(make_net()(jnp.asarray(x))), want, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_jds_matches_deepspeed_on_a_user_cnn(stage):
    ref = json.loads((FIXTURE / REFERENCE_FILE[stage]).read_text())
    config = json.loads((FIXTURE / CONFIG_FILE[stage]).read_text())
    data = np.load(FIXTURE / "batches.npz")
    engine = jds.initialize(model=make_net(), config=config, loss_fn=cifar.loss_fn,
                            devices=jax.devices()[:2])
    assert engine.mesh.shape["data"] == 2 and engine.batch.gradient_accumulation_steps == 2
    outs = [engine.train_batch({"image": cifar.normalise(x), "label": y})
            for x, y in zip(data["images"], data["labels"], strict=True)]
    steps = ref["steps"]
    np.testing.assert_allclose([o["loss"] for o in outs], [s["loss"] for s in steps],
                               atol=LOSS_ATOL, rtol=0)
    np.testing.assert_allclose([o["grad_norm"] for o in outs], [s["grad_norm"] for s in steps],
                               rtol=GRAD_NORM_RTOL)
    np.testing.assert_allclose([o["lr"] for o in outs], [s["lr"] for s in steps], rtol=1e-6,
                               atol=1e-12)
    got = jds_to_torch_checksums(jax.device_get(engine.state.params))
    want = ref["final_param_checksums"]["values"]
    for name, (s, sq) in want.items():
        np.testing.assert_allclose(got[name], (s, sq), atol=CHECKSUM_ATOL, err_msg=name)
    total = sum(x.nbytes for x in jax.tree.leaves(engine.state.params))
    per_device = sum(x.addressable_shards[0].data.nbytes
                     for x in jax.tree.leaves(engine.state.params))
    # ZeRO-3 cuts each device's parameter bytes by the data-parallel factor (2): every
    # parameter of this CNN has a dimension that divides by 2
    assert per_device == (total // 2 if stage == 3 else total)
