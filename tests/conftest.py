"""Test setup: CPU only, eight fake devices for the sharding tests (with XLA:CPU thread pools
large enough for them), float32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
# XLA:CPU sizes its intra-op thread pool max(cores, devices): 8 threads here on 2 cores. A sharded
# step's thunk executor hands ready thunks, collectives among them, to that pool (up to 4 workers
# per device), and a collective blocks its thread until every device joins it, so the pool can
# fill with waiting collectives while the devices they wait for have no thread left: a deadlock
# that XLA ends after 40 s with an abort (the CI run of 2026-12-03, in test_step.py; one in a few
# hundred (2, 2, 2)-mesh steps here). 8 threads per device leave a thread for every worker.
# Subprocesses inherit it. test_step.py's test_many_sharded_steps_do_not_deadlock checks it.
os.environ.setdefault("PJRT_NPROC", "64")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
