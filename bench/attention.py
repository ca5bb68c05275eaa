"""CPU attention speed: valley_jax's blocked attention against one-piece XLA and PyTorch.

    python bench/attention.py [--reps 8] [--json out.json]

At the shapes the demo and the train-step bench run (the ViT at 224 and 112 px, the decoders'
causal attention), forward and forward + backward, in one process on this machine's CPU threads:
`layers.attention` with `cpu_block=0` (jax.nn.dot_product_attention in one piece), with the
default `Policy.cpu_attention_block` (spans of query rows, written-out backward), and PyTorch's
`scaled_dot_product_attention`. The sides run in turn, one call each per round (bench/
train_step.py's `timed_in_turn`); each figure is a median in milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from train_step import timed_in_turn  # bench/, the script's folder
from valley_jax import layers
from valley_jax.layers import Policy

# name: (batch, queries = keys, query heads, key/value heads, head dim, causal)
SHAPES = {
    "vit_224px": (64, 257, 4, 4, 16, False),  # the train-step bench's demo: 8 x 8 frames
    "vit_112px": (64, 65, 4, 4, 16, False),  # the trainer's demo: 16 x 4 frames
    "llm_demo_bench": (8, 384, 4, 2, 32, True),
    "llm_demo_trainer": (16, 168, 4, 2, 32, True),
    "llm_large": (1, 512, 16, 16, 64, True),  # one 512-query block of the large config
}


def jax_fns(mask, block):
    f = lambda q, k, v: layers.attention(q, k, v, mask, cpu_block=block)  # noqa: E731
    loss = lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    fwd, bwd = jax.jit(f), jax.jit(jax.grad(loss, (0, 1, 2)))
    return (lambda *a: jax.block_until_ready(fwd(*a)),
            lambda *a: jax.block_until_ready(bwd(*a)))


def torch_fns(causal, groups):
    def fwd(q, k, v):
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=groups > 1)

    def bwd(q, k, v):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=groups > 1)
        torch.sin(out).sum().backward()
        return q.grad, k.grad, v.grad

    return fwd, bwd


def run(name, reps):
    b, t, n, kh, d, causal = SHAPES[name]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, t, n, d), dtype=np.float32)
    k, v = (rng.standard_normal((b, t, kh, d), dtype=np.float32) for _ in range(2))
    mask = jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None] if causal else None
    one_fwd, one_bwd = jax_fns(mask, 0)
    blk_fwd, blk_bwd = jax_fns(mask, Policy().cpu_attention_block)
    t_fwd, t_bwd = torch_fns(causal, n // kh)
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
    want = np.asarray(one_fwd(q, k, v))
    got = np.asarray(blk_fwd(q, k, v))
    torch_out = t_fwd(tq, tk, tv).transpose(1, 2).numpy()
    calls = {"one_fwd": (one_fwd, (q, k, v)), "blocked_fwd": (blk_fwd, (q, k, v)),
             "torch_fwd": (t_fwd, (tq, tk, tv)), "one_bwd": (one_bwd, (q, k, v)),
             "blocked_bwd": (blk_bwd, (q, k, v)), "torch_bwd": (t_bwd, (tq, tk, tv))}
    _, median = timed_in_turn({name: functools.partial(f, *a) for name, (f, a) in calls.items()},
                              reps)
    ms = {name: 1e3 * t for name, t in median.items()}
    return dict(shape=name, dims=SHAPES[name], ms=ms,
                max_abs_diff_blocked=float(np.abs(got - want).max()),
                max_abs_diff_torch=float(np.abs(torch_out - want).max()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())  # as bench/train_step.py
    print(f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; milliseconds, medians of {args.reps}")
    results = []
    for name in args.shapes.split(","):
        r = run(name, args.reps)
        results.append(r)
        ms = r["ms"]
        cells = []
        for part, label in (("fwd", "fwd"), ("bwd", "fwd+bwd")):
            one, blocked, ref = ms[f"one_{part}"], ms[f"blocked_{part}"], ms[f"torch_{part}"]
            cells.append(f"{label}: one piece {one:6.1f}  blocked {blocked:6.1f}  torch {ref:6.1f}"
                         f"  ({one / blocked:.2f}x, vs torch {ref / blocked:.2f}x)")
        print(f"{name:17s} " + " | ".join(cells) +
              f" | max diff {r['max_abs_diff_blocked']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
