"""Peak host memory of weight conversion on a synthetic ~1B-parameter Valley checkpoint.

    python bench/convert_memory.py [--dtype bfloat16|float32] [--shard-mb 512] [--depth 12]

Writes a checkpoint in the authors' layout (ValleyLlamaForCausalLM key names, CLIP ViT-L/14
tower, a LLaMA of width 2048 and `--depth` layers, vocabulary 32008, v1 mean) as safetensors
shards of at most `--shard-mb`, then runs, each in a fresh subprocess:

  from-valley   the shards -> a valley_jax model checkpoint
  to-hf         that checkpoint -> the authors' layout again (same shard limit)

and reports each one's RSS high-water mark (VmHWM, which counts the mapped pages of the shards
being read too), the high-water mark after the imports (baseline), and the target
1.5 x largest shard + the converted state.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from valley_jax import hf  # noqa: E402
from valley_jax.config import LlamaConfig, ValleyConfig, VisionConfig  # noqa: E402

GIB = 1024 ** 3

# Runs in the child: imports what the conversion uses, notes the baseline, converts, reports.
# The high-water mark is /proc's VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
# from the parent across fork + exec, so a child would report this (larger) process's peak.
CHILD = """
import json, sys, time
def high_water():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import jax, flax.nnx, orbax.checkpoint, safetensors, tqdm
from valley_jax import convert
baseline = high_water()
start = time.time()
status = convert.main(sys.argv[1:])
print(json.dumps(dict(status=status, seconds=time.time() - start, baseline=baseline,
                      peak=high_water())))
"""


def synthetic_config(depth: int) -> ValleyConfig:
    llm = LlamaConfig(vocab_size=32008, hidden=2048, depth=depth, heads=16, kv_heads=16,
                      head_dim=128, mlp_dim=5504, rms_eps=1e-5, max_position=2048)
    return ValleyConfig(vision=VisionConfig(), llm=llm, temporal="mean")


def authors_config(cfg: ValleyConfig, dtype: str) -> dict:
    """config.json as a release has it: no tokenizer, so the media token ids are given."""
    d = hf.llama_config_to_hf(cfg.llm)
    d.update(architectures=[hf.VALLEY_ARCHITECTURE], model_type="valley", torch_dtype=dtype,
             mm_vision_tower="openai/clip-vit-large-patch14", mm_hidden_size=1024,
             mm_vision_select_layer=-2, mm_use_im_start_end=True, use_mm_proj=True,
             im_patch_token=32004, vi_frame_token=32001)
    return d


def write_checkpoint(folder, cfg: ValleyConfig, dtype, shard_bytes: int) -> dict:
    """Random tensors of every authors' key, streamed into shards; returns sizes."""
    rng = np.random.default_rng(0)
    entries = hf.valley_entries(cfg)
    writer = hf.ShardedWriter(folder, "model", shard_bytes)
    shapes = _hf_shapes(cfg)
    params = 0
    for e in entries:
        shape = shapes[e.hf]
        params += int(np.prod(shape))
        writer.add(e.hf, (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype))
    files = writer.close()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(authors_config(cfg, np.dtype(dtype).name), f, indent=2)
    sizes = [os.path.getsize(os.path.join(folder, n)) for n in files]
    return dict(params=params, shards=len(files), largest_shard=max(sizes), total=sum(sizes),
                state=writer.total_bytes)


def _hf_shapes(cfg: ValleyConfig) -> dict:
    """Each Hugging Face tensor's shape, by exporting an all-zeros abstract state."""
    from flax import nnx
    from valley_jax.valley import Valley
    flat = hf.flat_shapes(nnx.eval_shape(lambda: Valley(cfg, rngs=nnx.Rngs(0))))
    shapes = {}
    for e in hf.valley_entries(cfg):
        one = flat[e.path][1:] if e.layer is not None else flat[e.path]
        # to_hf only reshapes / transposes: run it on a one-byte array of the right shape.
        shapes[e.hf] = e.to_hf(np.zeros(one, np.uint8)).shape
    return shapes


def measure(args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                            env=env, cwd=REPO)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"conversion failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--shard-mb", type=int, default=512, help="largest shard, MiB")
    parser.add_argument("--depth", type=int, default=12, help="LLaMA layers (12: ~1.04B total)")
    parser.add_argument("--workdir", help="where to write (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written folders")
    args = parser.parse_args()

    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    work = args.workdir or tempfile.mkdtemp(prefix="convert_memory_")
    source, ckpt, export = (os.path.join(work, n) for n in ("valley", "ckpt", "export"))
    for d in (source, ckpt, export):
        shutil.rmtree(d, ignore_errors=True)
    try:
        start = time.time()
        sizes = write_checkpoint(source, synthetic_config(args.depth), dtype,
                                 args.shard_mb * 1024 ** 2)
        print(f"wrote {sizes['params'] / 1e9:.3f}B parameters ({args.dtype}) as "
              f"{sizes['shards']} shards, largest {sizes['largest_shard'] / GIB:.3f} GiB, "
              f"in {time.time() - start:.0f} s", flush=True)
        target = 1.5 * sizes["largest_shard"] + sizes["state"]
        report = dict(sizes, dtype=args.dtype, target=target)
        runs = {"from-valley": ["from-valley", "--model", source, "--out", ckpt],
                "to-hf": ["to-hf", "--checkpoint", ckpt, "--out", export, "--format", "valley",
                          "--shard-size", f"{args.shard_mb}MiB"]}
        for name, argv in runs.items():
            r = measure(argv)
            report[name] = r
            ok = "meets" if r["peak"] <= target else "MISSES"
            print(f"{name:12s} peak RSS {r['peak'] / GIB:.3f} GiB (baseline after imports "
                  f"{r['baseline'] / GIB:.3f} GiB, conversion {(r['peak'] - r['baseline']) / GIB:.3f}"
                  f" GiB) in {r['seconds']:.0f} s; target 1.5 x {sizes['largest_shard'] / GIB:.3f}"
                  f" + {sizes['state'] / GIB:.3f} = {target / GIB:.3f} GiB: {ok}", flush=True)
        print(json.dumps(report))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
