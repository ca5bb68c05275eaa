"""Ahead-of-time compilation for TPU (and GPU) targets from this CPU host: the real train step of
the demo config compiles for a v5p-8, and the report's numbers are what they must be."""

import importlib.util
import json
import os
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from valley_jax import aot, sharding, train
from valley_jax.valley import Valley

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3


def require_libtpu():
    """libtpu has wheels for Linux x86-64 only: elsewhere the TPU tests cannot run and are
    skipped; there, a missing libtpu is a broken install (the `tpu` extra), not a skip."""
    if importlib.util.find_spec("libtpu") is not None:
        return
    if sys.platform == "linux" and platform.machine() == "x86_64":
        pytest.fail("libtpu is missing: pip install -e '.[tpu]' (jax[tpu]==0.10.2)")
    pytest.skip(f"no libtpu wheel for {sys.platform}/{platform.machine()}")


def run_aot(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "valley_jax.aot", *args, "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def demo_config():
    spec = importlib.util.spec_from_file_location("finetune", os.path.join(ROOT, "configs/finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("demo")


def state_bytes(config) -> int:
    """Bytes of the whole train state (parameters + optimizer state), unsharded."""
    ids, rows = aot.preset_token_ids(config)
    cfg = train.model_config(config, ids, None)
    model = nnx.eval_shape(lambda: Valley(cfg, train.policy_from(config), rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    setup = train.build_step(config, cfg, model, mesh, rows)
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(setup.abstract_state))


@pytest.fixture(scope="module")
def demo_v5p8():
    require_libtpu()
    return run_aot("--config=configs/finetune.py:demo", "--topology=v5p-8")


def test_demo_step_compiles_for_v5p8_with_memory_and_flops(demo_v5p8):
    r = demo_v5p8
    assert r["config"] == "configs/finetune.py:demo" and r["target"] == "v5p-8"
    assert (r["platform"], r["devices"], r["hosts"]) == ("tpu", 4, 1)
    assert r["hbm_bytes"] == r["limit_bytes"] == 95 * GiB
    assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert (r["batch_size"], r["per_device_batch"], r["seq_len"], r["num_frames"]) == (16, 4, 168, 4)
    m = r["memory"]
    assert set(m) == {"arguments", "outputs", "aliased", "temporaries", "generated_code", "total"}
    assert all(m[k] > 0 for k in m)
    assert m["total"] == (m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
                          + m["generated_code"])
    assert r["fits"] is True and m["total"] < r["limit_bytes"]
    f = r["flops"]
    assert f["analytic_per_step"] > 0 and f["xla_per_device"] > 0
    assert f["analytic_per_device"] == pytest.approx(f["analytic_per_step"] / 4)
    assert r["compile_seconds"] > 0 and r["ideal_step_seconds"] > 0


def test_donated_state_is_one_replicated_copy_per_chip(demo_v5p8):
    """On the data=4 mesh every chip holds the whole train state, donated: the aliased bytes are
    the state's (TPU layouts pad small arrays, hence the margin), and the non-aliased arguments
    are the chip's quarter of the batch."""
    m = demo_v5p8["memory"]
    state = state_bytes(demo_config())
    assert state <= m["aliased"] <= 1.3 * state
    assert 0 < m["arguments"] - m["aliased"] < 0.3 * state


@pytest.mark.parametrize("name,topology,devices,hosts,host_bounds", [
    ("v4-8", "v4:2x2x1", 4, 1, (2, 2, 1)),
    ("v5p-8", "v5p:2x2x1", 4, 1, (2, 2, 1)),
    ("v5p-16", "v5p:2x2x2", 8, 2, (2, 2, 1)),
    ("v5p-128", "v5p:4x4x4", 64, 16, (2, 2, 1)),
    ("v5e-8", "v5e:2x4", 8, 1, (2, 4, 1)),
    ("v5litepod-16", "v5e:4x4", 16, 4, (2, 2, 1)),
    ("v6e-64", "v6e:8x8", 64, 16, (2, 2, 1)),
    ("v5p:2x2x3", "v5p:2x2x3", 12, 3, (2, 2, 1)),
])
def test_tpu_names_map_to_slices(name, topology, devices, hosts, host_bounds):
    t = aot.parse_target(name)
    assert (t.platform, t.topology_name, t.chips, t.hosts) == ("tpu", topology, devices, hosts)
    assert t.topology_kwargs["chips_per_host_bounds"] == host_bounds


def test_gpu_names_map_to_hosts_of_eight():
    t = aot.parse_target("h100-16")
    assert (t.platform, t.chips, t.hosts, t.topology_kwargs["topology"]) == ("cuda", 16, 2, "1x2x8")
    assert t.limit_bytes == int(0.9 * t.hbm_bytes)
    with pytest.raises(ValueError, match="whole hosts"):
        aot.parse_target("h100-12")
    with pytest.raises(ValueError, match="unknown accelerator"):
        aot.parse_target("a100-8")


@pytest.mark.parametrize("threshold,start,limit,expected", [
    (37, 8, 1000, (37, False)),  # doubling 8 -> 64, then bisection
    (37, 100, 1000, (37, False)),  # halving 100 -> 50 -> 25, then bisection
    (1, 8, 1000, (1, False)),
    (0, 8, 1000, (0, False)),  # nothing fits
    (5000, 8, 1000, (1000, True)),  # everything up to the cap fits
])
def test_batch_search_finds_the_largest_fitting_size(threshold, start, limit, expected):
    calls = []

    def fits(k):
        calls.append(k)
        return k <= threshold

    assert aot.largest_fitting(fits, start, limit) == expected
    assert len(calls) == len(set(calls)) and len(calls) <= 2 * np.log2(limit) + 2


def test_demo_step_compiles_for_h100_without_a_gpu():
    """The CUDA plugin compiles for a described H100 on this CPU-only host."""
    try:
        plugin = importlib.util.find_spec("jax_plugins.xla_cuda12")
    except ModuleNotFoundError:  # not even the jax_plugins namespace
        plugin = None
    if plugin is None:
        pytest.skip("no CUDA plugin: pip install jax-cuda12-pjrt==0.10.2 jax-cuda12-plugin==0.10.2")
    r = run_aot("--config=configs/finetune.py:demo", "--topology=h100-8")
    assert (r["platform"], r["devices"], r["mesh"]["data"]) == ("cuda", 8, 8)
    assert r["memory"]["total"] > r["memory"]["temporaries"] > 0 and r["fits"] is True
