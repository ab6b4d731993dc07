"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache stays off in tests (tests/test_cli.py turns it on
# in a subprocess with its own folder).
os.environ["JDS_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
