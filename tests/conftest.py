"""Test setup: CPU only, eight fake devices for the sharding tests (with XLA:CPU thread pools
large enough for them), float32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
# XLA:CPU's intra-op pool is max(cores, devices) threads, which 8 devices' blocked collectives can
# fill (a deadlock XLA ends with an abort after 40 s: the CI run of 2026-12-03): the trainer's
# PJRT_NPROC rule, 8 threads per device, here too. Subprocesses inherit it.
from valley_jax import sharding  # noqa: E402

sharding.size_cpu_thread_pools(os.environ)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
