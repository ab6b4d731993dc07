"""Write tests/fixtures/ds_pld_schedule.json from DeepSpeed's own ProgressiveLayerDrop class.

    python scripts/make_pld_table.py [--deepspeed-src DIR] [--out tests/fixtures]

DeepSpeed 0.19 (the test extra's version) no longer ships
``deepspeed/runtime/progressive_layer_drop.py``; 0.16.0 does. The script takes that file from
a DeepSpeed 0.16.0 source tree (``--deepspeed-src``, or downloads the sdist with ``pip
download deepspeed==0.16.0 --no-binary :all:``), loads the class as it is (its only import,
``deepspeed.utils.log_dist``, comes from the installed DeepSpeed) and drives it as 0.16.0's
``DeepSpeedEngine`` does: ``forward`` passes ``get_state()`` (``pld_theta`` =
``get_theta()``) to the model in training, and ``step()`` calls
``update_state(self.global_steps)`` at the accumulation boundary before
``_take_model_step`` increments ``global_steps``. Each record is the ``pld_theta`` the
forward passes of global step ``t`` see.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CASES = [(0.5, 0.001), (0.1, 0.05), (0.9, 0.5), (1.0, 0.01), (0.25, 0.1)]
STEPS = 60
FILE = "deepspeed/runtime/progressive_layer_drop.py"


def _source(src: str | None) -> Path:
    if src:
        return Path(src) / FILE
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", "deepspeed==0.16.0", "--no-deps",
                    "--no-binary", ":all:", "-d", str(tmp), "-q"], check=True)
    with tarfile.open(next(tmp.glob("deepspeed-0.16.0.tar.gz"))) as tar:
        member = f"deepspeed-0.16.0/{FILE}"
        tar.extract(member, tmp, filter="data")
    return tmp / "deepspeed-0.16.0" / FILE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed-src", help="a DeepSpeed 0.16.0 source tree (default: download)")
    p.add_argument("--out", default="tests/fixtures")
    args = p.parse_args()
    path = _source(args.deepspeed_src)
    spec = importlib.util.spec_from_file_location("ds_progressive_layer_drop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cases = []
    for theta, gamma in CASES:
        pld = mod.ProgressiveLayerDrop(theta=theta, gamma=gamma)
        seen = []
        for global_steps in range(STEPS):
            seen.append(float(pld.get_state()["pld_theta"]))  # this step's forward passes
            pld.update_state(global_steps)  # engine.step(), before global_steps += 1
        cases.append({"theta": theta, "gamma": gamma, "pld_theta": seen})
    out = Path(args.out) / "ds_pld_schedule.json"
    out.write_text(json.dumps({"source": "deepspeed 0.16.0 " + FILE, "cases": cases}) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
