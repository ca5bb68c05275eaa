"""Prove a run config fits a TPU slice or GPU hosts before renting them: compile the real train
step ahead of time, on this CPU host, for the target's devices.

    python -m valley_jax.aot --config=configs/finetune.py:7b --topology=v5p-8
    python -m valley_jax.aot --config=configs/pretrain.py:13b --topology=v5p-16 --json
    python -m valley_jax.aot --config=configs/finetune.py:7b --topology=h100-8 --search

The model is built abstractly (no weights), the mesh is laid over the target's compile-only
devices as the config's mesh fields say, and `train.build_step` gives the jitted step the trainer
runs; it is lowered with the abstract state, the batch shapes and a PRNG key, and compiled by the
target's own compiler. Printed: per-chip memory from XLA's buffer assignment against the chip's
HBM, FLOPs per step (analytic and XLA's), and with --search the largest global batch that fits,
found by compiling (doubling, then bisection).

TPU targets need libtpu (`pip install 'jax[tpu]==0.10.2'`). GPU targets need the CUDA PJRT
plugin (`pip install jax-cuda12-pjrt==0.10.2 jax-cuda12-plugin==0.10.2`), but neither a GPU nor
the CUDA libraries: the plugin compiles for a device described by a target config.

--config and its --config.FIELD=VALUE overrides are the trainer's (see --helpfull).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import types
from typing import Callable

# Compiling for a slice never runs anything on this host's devices: keep JAX on the CPU where
# libtpu is installed; tell libtpu that this host is no TPU worker, which it would otherwise try
# to discover (metadata-server queries, then errors about the missing slice on stderr); and let
# it load while another process on this host holds libtpu's lockfile (any JAX process started
# without JAX_PLATFORMS=cpu takes it), since compiling needs no TPU to itself.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _name, _value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                      ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                      ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_name, _value)

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from flax import nnx  # noqa: E402

from valley_jax import config as config_lib  # noqa: E402
from valley_jax import flops as flops_lib  # noqa: E402
from valley_jax import sharding, tokens, train  # noqa: E402
from valley_jax.valley import Valley  # noqa: E402

# --config (with --config.FIELD=VALUE overrides) is the trainer's own flag, defined by
# valley_jax.train: the config is read exactly as a training run reads it.
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Target: a Cloud TPU name (v4-8, v5p-16, v5e-16, v6e-8, or with its shape, "
    "v5p:2x2x4) or GPU hosts (h100-8 = one host of 8, h100-16 = two hosts).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the report.")
_SEARCH = flags.DEFINE_bool("search", False, "Also find the largest global batch that fits, by "
                            "compiling (doubling, then bisection; minutes per compile at 7B).")
_MAX_PER_DEVICE = flags.DEFINE_integer("max_per_device_batch", 256,
                                       "The search stops doubling at this many rows per device.")

GiB = 1024 ** 3


# ---------------------------------------------------------------------------------------------
# Targets


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given: v5p-16, v5p:2x2x4, h100-8
    platform: str  # tpu | cuda
    chips: int  # devices: TPU chips (one device each) or GPUs
    hosts: int
    hbm_bytes: int  # per device
    limit_bytes: int  # what a training step may use of it
    peak_flops: float  # dense bf16 FLOP/s per device
    topology_name: str  # what the platform's compiler calls it
    topology_kwargs: dict  # the rest of get_topology_desc's arguments


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    prefix: str  # libtpu's topology prefix
    cores_per_chip: int  # v4 and v5p names count TensorCores (v5p-8 = 4 chips)
    ndim: int  # torus dimensions
    chip_config: str  # megacore: one device per chip
    host_bounds: tuple  # chips per host (of a slice larger than one host)
    hbm_bytes: int
    peak_flops: float


TPUS = {
    "v4": TpuGeneration("v4", 2, 3, "megacore", (2, 2, 1), 32 * GiB, 275e12),
    "v5p": TpuGeneration("v5p", 2, 3, "megacore", (2, 2, 1), 95 * GiB, 459e12),
    "v5e": TpuGeneration("v5e", 1, 2, "default", (2, 2, 1), 16 * GiB, 197e12),
    "v6e": TpuGeneration("v6e", 1, 2, "default", (2, 2, 1), 32 * GiB, 918e12),
}
TPU_ALIASES = {"v5litepod": "v5e"}

# An H100 SXM as the CUDA plugin's compiler sees it (a GpuTargetConfigProto in text form; the
# values are those XLA records for this GPU in xla/backends/gpu/target_config/specs/h100_sxm).
H100_HBM = 84942979072  # bytes: 80 GB
H100_TARGET_CONFIG = f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {H100_HBM}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPUS = {"h100": (H100_TARGET_CONFIG, H100_HBM, 989e12, 8)}  # config, HBM, peak, GPUs per host
# JAX's share of GPU memory under launch/gpu/run.sh (XLA_PYTHON_CLIENT_MEM_FRACTION): NCCL and
# the CUDA libraries need the rest.
GPU_MEMORY_FRACTION = 0.9


def slice_shape(chips: int, ndim: int) -> tuple[int, ...]:
    """The standard shape of a slice of `chips` chips (a power of two): from one host's 2x2x1
    (3-D) or one chip (2-D), double the last of the smallest dimensions:
    v5p 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4; v5e 8 -> 2x4, 16 -> 4x4."""
    if chips < 1 or chips & (chips - 1) or (ndim == 3 and chips < 4):
        raise ValueError(f"no standard slice of {chips} chips: give its shape (e.g. v5p:2x2x3)")
    shape = [2, 2, 1] if ndim == 3 else [1, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
    return tuple(shape)


def parse_target(name: str) -> Target:
    """v5p-16 (Cloud TPU accelerator type), v5p:2x2x4 (explicit shape) or h100-16 (GPUs)."""
    if ":" in name:
        gen, shape_str = name.split(":", 1)
        shape = tuple(int(s) for s in shape_str.split("x"))
    else:
        gen, _, count = name.rpartition("-")
        if not gen or not count.isdigit():
            raise ValueError(f"unknown topology {name!r}: e.g. v5p-8, v5e-16, v5p:2x2x4, h100-8")
        shape = None
    gen = TPU_ALIASES.get(gen.lower(), gen.lower())
    if gen in GPUS:
        target_config, hbm, peak, per_host = GPUS[gen]
        gpus = int(count)
        if gpus > per_host and gpus % per_host:
            raise ValueError(f"{name}: {gpus} GPUs are not whole hosts of {per_host}")
        hosts = max(1, gpus // per_host)
        return Target(name, "cuda", gpus, hosts, hbm, int(hbm * GPU_MEMORY_FRACTION), peak, name,
                      dict(target_config=target_config,
                           topology=f"1x{hosts}x{gpus // hosts}"))
    if gen not in TPUS:
        raise ValueError(f"unknown accelerator {gen!r} in {name!r}: {', '.join([*TPUS, *GPUS])}")
    g = TPUS[gen]
    if shape is None:
        shape = slice_shape(int(count) // g.cores_per_chip, g.ndim)
    if len(shape) != g.ndim:
        raise ValueError(f"{name}: {gen} slices have {g.ndim} dimensions")
    chips = math.prod(shape)
    shape3 = shape + (1,) * (3 - len(shape))
    # Slices of up to 8 single-core chips are one host (v5e-8, v6e-8); others have hosts of 2x2.
    host_bounds = shape3 if g.ndim == 2 and chips <= 8 else tuple(
        min(b, s) for b, s in zip(g.host_bounds, shape3))
    hosts = chips // math.prod(host_bounds)
    return Target(name, "tpu", chips, hosts, g.hbm_bytes, g.hbm_bytes, g.peak_flops,
                  f"{g.prefix}:{'x'.join(map(str, shape))}",
                  dict(chip_config_name=g.chip_config, num_slices=1,
                       chips_per_host_bounds=host_bounds))


def target_devices(target: Target) -> list:
    """Compile-only devices of the target (they can compile, never run)."""
    from jax.experimental import topologies
    if target.platform == "tpu":
        try:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology_name,
                                                **target.topology_kwargs)
        except RuntimeError as err:
            if "TPU support not installed" in str(err):
                raise SystemExit("compiling for TPUs needs libtpu: pip install 'jax[tpu]==0.10.2'")
            raise
    else:
        try:
            topo = topologies.get_topology_desc(platform="cuda", topology_name=target.topology_name,
                                                **target.topology_kwargs)
        except (NotImplementedError, RuntimeError) as err:
            raise SystemExit(f"compiling for GPUs needs the CUDA plugin: pip install "
                             f"jax-cuda12-pjrt==0.10.2 jax-cuda12-plugin==0.10.2 ({err})")
    return list(topo.devices)


# ---------------------------------------------------------------------------------------------
# Compiling the step


def preset_token_ids(config):
    """The token ids and vocabulary `train.model_config` takes from a tokenizer, here from the
    preset (which has them for a LLaMA tokenizer), and the first new embedding row: [PAD] and
    Valley's tokens are the last rows, as added to a LLaMA tokenizer that has no pad token."""
    cfg = config_lib.preset(config.model.preset)
    ids = types.SimpleNamespace(vocab_size=cfg.llm.vocab_size, im_patch=cfg.im_patch_id,
                                vi_frame=cfg.vi_frame_id)
    return ids, cfg.llm.vocab_size - (len(tokens.ADDED_TOKENS) + 1)


def abstract_rng():
    return jax.eval_shape(lambda: jax.random.key(0))


@dataclasses.dataclass
class Compiled:
    compiled: object
    cfg: object  # the model's ValleyConfig
    seconds: float  # lowering and compiling


def compiler_options(platform: str) -> dict:
    """Without a GPU nothing autotunes Triton GEMM tilings, and XLA's untuned pick fails for
    some shapes ('Couldn't find output tile sizes'): compile GEMMs as cuBLAS calls, which need
    no tuning. Only which elementwise work fuses into a GEMM may differ from a tuned run; the
    buffers, and so the memory, are planned the same way."""
    return {"xla_gpu_enable_triton_gemm": False} if platform in ("cuda", "gpu") else {}


def config_mesh(config, devices):
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                              devices=devices)


def compile_step(config, mesh) -> Compiled:
    """The trainer's step for `config`, lowered and compiled for the devices of `mesh`."""
    ids, embed_rows_from = preset_token_ids(config)
    cfg = train.model_config(config, ids, None)
    # The compile target is a TPU or GPU while this process's backend is the CPU: no CPU-only
    # blocked attention in the compiled program.
    policy = dataclasses.replace(train.policy_from(config), cpu_attention_block=0)
    model = nnx.eval_shape(lambda: Valley(cfg, policy, rngs=nnx.Rngs(config.seed)))
    setup = train.build_step(config, cfg, model, mesh, embed_rows_from)
    start = time.perf_counter()
    lowered = setup.step.lower(setup.abstract_state, train.batch_shapes(config, cfg),
                               abstract_rng())
    compiled = lowered.compile(compiler_options(mesh.devices.flat[0].platform))
    return Compiled(compiled, cfg, time.perf_counter() - start)


def memory_per_device(compiled) -> dict:
    """Bytes per device from XLA's buffer assignment. The donated state is both an argument and
    an output but one buffer: `aliased` is subtracted once from the total."""
    m = compiled.memory_analysis()
    out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
               aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
               generated_code=m.generated_code_size_in_bytes)
    out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                    + out["generated_code"])
    return out


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def is_out_of_memory(err: Exception) -> bool:
    """A compiler that checks memory itself (XLA:TPU on a real slice) fails with these."""
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def data_parallel(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def with_batch(config, batch: int):
    c = ml_collections.ConfigDict(config.to_dict())
    c.batch_size = batch
    return c


# ---------------------------------------------------------------------------------------------
# Report


def analyse(config, target: Target, devices) -> dict:
    """Compile `config` for `target`; the report as a JSON-ready dict (sizes in bytes)."""
    result = dict(target=target.name, platform=target.platform, devices=target.chips,
                  hosts=target.hosts, hbm_bytes=target.hbm_bytes, limit_bytes=target.limit_bytes,
                  stage=config.stage, preset=config.model.preset, batch_size=config.batch_size,
                  micro_batches=config.micro_batches, seq_len=config.data.max_length,
                  num_frames=config.model.num_frames, dtype=config.model.dtype,
                  param_dtype=config.model.param_dtype, remat=config.model.remat)
    mesh = config_mesh(config, devices)
    dp = data_parallel(mesh)
    if config.batch_size % (dp * config.micro_batches):
        raise ValueError(f"batch_size {config.batch_size} is not a multiple of the data-parallel "
                         f"size {dp} x micro_batches {config.micro_batches}")
    result.update(mesh=dict(mesh.shape), per_device_batch=config.batch_size // dp)
    try:
        c = compile_step(config, mesh)
    except Exception as err:  # noqa: BLE001 - an out-of-memory compile is a result, not a crash
        if not is_out_of_memory(err):
            raise
        result.update(fits=False, error=str(err).splitlines()[0][:500])
        return result
    mem = memory_per_device(c.compiled)
    analytic = flops_lib.step_flops(c.cfg, batch=config.batch_size, seq_len=config.data.max_length,
                                    num_frames=config.model.num_frames, stage=config.stage,
                                    train_vision=config.model.train_vision)["total"]
    result.update(
        memory=mem, fits=mem["total"] <= target.limit_bytes, compile_seconds=round(c.seconds, 1),
        flops=dict(analytic_per_step=analytic, analytic_per_device=analytic / target.chips,
                   xla_per_device=xla_flops(c.compiled)),
        # Seconds per step at 100 % of peak: a lower bound to plan a run's length with.
        ideal_step_seconds=analytic / (target.chips * target.peak_flops))
    return result


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> tuple[int, bool]:
    """The largest k in [1, limit] for which fits(k), where fits holds up to some k and not
    above: doubling up (or halving down) from `start` brackets it, bisection pins it. Returns
    (k, capped): k = 0 when even 1 does not fit; capped when `limit` itself fits."""
    k = min(max(start, 1), limit)
    if fits(k):
        good, bad = k, None
        while bad is None and good < limit:
            k = min(2 * good, limit)
            good, bad = (k, None) if fits(k) else (good, k)
    else:
        good, bad = 0, k
        while good == 0 and bad > 1:
            k = bad // 2
            good, bad = (k, bad) if fits(k) else (0, k)
        if good == 0:
            return 0, False
    while bad is not None and bad - good > 1:
        k = (good + bad) // 2
        good, bad = (k, bad) if fits(k) else (good, k)
    return good, bad is None


def search_batch(config, target: Target, devices, first: dict, log=print) -> dict:
    """The largest global batch that fits, in steps of the smallest batch the mesh and the
    micro-batching accept (one row per data-parallel shard and micro-batch), starting from the
    config's batch, whose report `first` is. Every other candidate is compiled: minutes each
    at 7B."""
    dp = data_parallel(config_mesh(config, devices))
    unit = dp * config.micro_batches
    tried = {config.batch_size: first}

    def fits(k: int) -> bool:
        if k * unit not in tried:
            r = analyse(with_batch(config, k * unit), target, devices)
            tried[k * unit] = r
            log(f"  batch {k * unit:5d} ({k * unit // dp} per device): "
                + (f"{r['memory']['total'] / GiB:.1f} GiB" if "memory" in r else "out of memory")
                + (", fits" if r["fits"] else ", does not fit"))
        return tried[k * unit]["fits"]

    best, capped = largest_fitting(fits, config.batch_size // unit,
                                   max(1, _MAX_PER_DEVICE.value * dp // unit))
    return dict(max_batch=best * unit, max_per_device_batch=best * unit // dp, capped=capped,
                tried=[dict(batch=b, fits=r["fits"], total_bytes=r.get("memory", {}).get("total"),
                            compile_seconds=r.get("compile_seconds"))
                       for b, r in sorted(tried.items())])


def format_report(r: dict) -> str:
    lines = [f"{r['config']} on {r['target']} ({r['devices']} devices, {r['hosts']} host"
             f"{'s' if r['hosts'] > 1 else ''}, {r['platform']})"]
    if r.get("overrides"):
        lines.append("  overrides: " + " ".join(f"{k}={v}" for k, v in r["overrides"].items()))
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines.append(f"  mesh {mesh}; global batch {r['batch_size']} ({r['per_device_batch']} per "
                 f"device), {r['micro_batches']} micro-batch(es), {r['seq_len']} tokens, "
                 f"{r['num_frames']} frames, {r['dtype']} compute, remat {r['remat']}")
    if "memory" not in r:
        lines.append(f"  DOES NOT FIT: {r['error']}")
    else:
        m = r["memory"]
        lines.append("  memory per device (GiB): " + "  ".join(
            f"{k} {m[k] / GiB:.2f}" for k in ("arguments", "outputs", "aliased", "temporaries",
                                               "generated_code")))
        lines.append(f"  total {m['total'] / GiB:.2f} GiB of {r['limit_bytes'] / GiB:.1f} GiB "
                     f"({100 * m['total'] / r['limit_bytes']:.0f} %): "
                     f"{'fits' if r['fits'] else 'DOES NOT FIT'}")
        f = r["flops"]
        xla = f"{f['xla_per_device']:.3e}" if f["xla_per_device"] is not None else "n/a"
        lines.append(f"  FLOPs per step: analytic {f['analytic_per_step']:.3e} "
                     f"({f['analytic_per_device']:.3e} per device); XLA per device {xla} (it "
                     f"counts a scanned loop's body once); at peak {r['ideal_step_seconds']:.2f} "
                     f"s per step")
        lines.append(f"  compiled in {r['compile_seconds']:.0f} s")
    if "search" in r:
        s = r["search"]
        lines.append(f"  largest batch that fits: {s['max_batch']} global "
                     f"({s['max_per_device_batch']} per device)"
                     + (", the search's cap (--max_per_device_batch)" if s["capped"] else ""))
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    if not _TOPOLOGY.value:
        raise app.UsageError("--topology is required (e.g. v5p-8)")
    config = flags.FLAGS.config
    try:
        target = parse_target(_TOPOLOGY.value)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    devices = target_devices(target)
    result = dict(config=flags.FLAGS["config"].serialize().split("=", 1)[-1],
                  overrides=config_flags.get_override_values(flags.FLAGS["config"]),
                  **analyse(config, target, devices))
    if _SEARCH.value:
        log = (lambda s: print(s, file=sys.stderr)) if _JSON.value else print
        log("searching for the largest batch that fits:")
        result["search"] = search_batch(config, target, devices, result, log)
    print(json.dumps(result, indent=2) if _JSON.value else format_report(result))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
