"""Record DeepSpeed's flops profiler on the tutorial CNN as ``tests/fixtures/ds_profile_cnn.json``.

The model is the CIFAR-10 CNN of DeepSpeed's first tutorial (the torch twin of
``examples/cifar_cnn.py``'s ``Net``)::

    conv1 = Conv2d(3, 6, 5); pool = MaxPool2d(2, 2); conv2 = Conv2d(6, 16, 5)
    fc1 = Linear(16*5*5, 120); fc2 = Linear(120, 84); fc3 = Linear(84, 10)
    x = pool(relu(conv1(x))); x = pool(relu(conv2(x))); x = flatten(x, 1)
    x = relu(fc1(x)); x = relu(fc2(x)); return fc3(x)

profiled by ``deepspeed.profiling.flops_profiler.get_model_profile(model,
input_shape=(1, 3, 32, 32), as_string=False)`` (one image), plus each child module's FLOPs, MACs
and parameters read from the same profiler (``FlopsProfiler`` started around one forward).
The fixture is what ``tests/test_model_profile.py`` holds ``jds.profiling.get_model_profile``
to: MACs and parameters exactly, FLOPs within 3%.

    pip install torch deepspeed
    DS_ACCELERATOR=cpu python scripts/make_deepspeed_profile_reference.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.profiling.flops_profiler import FlopsProfiler, get_model_profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_deepspeed_cnn_reference import net_class  # noqa: E402  (the tutorial's torch Net)

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ds_profile_cnn.json"


def main() -> None:
    torch.manual_seed(0)
    net = net_class()().eval()
    shape = (1, 3, 32, 32)
    flops, macs, params = get_model_profile(net, input_shape=shape, print_profile=False,
                                            as_string=False)
    prof = FlopsProfiler(net)
    prof.start_profile()
    with torch.no_grad():
        net(torch.zeros(shape))
    modules = {name: {"flops": int(sum(m.__flops__ for m in mod.modules())),
                      "macs": int(sum(m.__macs__ for m in mod.modules())),
                      "params": int(mod.__params__)}
               for name, mod in net.named_children()}
    prof.end_profile()
    record = {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
              "input_shape": list(shape), "flops": int(flops), "macs": int(macs),
              "params": int(params), "modules": modules}
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
