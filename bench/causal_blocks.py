"""The decoder's causal attention in query blocks (`model.attention_block`) at the CPU demo's
shapes: forward + backward time per block size, side by side in one run.

    LD_PRELOAD=libtcmalloc_minimal.so.4 python bench/causal_blocks.py [--reps 15] [--json out.json]

`layers.causal_attention` as the LLM layer calls it (queries [start, end) over keys [0, end),
key padding masked, the CPU's blocked attention inside), jitted with its gradient with respect to
q, k and v for a random output gradient: one layer of the demo's stage-2 step, 16 rows of 168
tokens (a tenth of them padding). Two head layouts: the demo's LLM now (8 heads of 16, each with
its own keys and values) and up to session 23 (4 heads of 32 sharing 2 key-value heads). Block
sizes: 512 (one block: every query over all 168 keys, the trainer's default), 84, 56 (the demo's
since session 25) and 42. The sizes take turns, one call each per round (bench/train_step.py's
`timed_in_turn`); reported: median milliseconds, the ratio against one block, and the largest
difference of any gradient from one block's (rounding: the blocks add the same terms in another
order).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from train_step import timed_in_turn  # bench/, the script's folder
from valley_jax import layers

BATCH, TOKENS = 16, 168
HEADS = {"8 heads of 16 (the demo)": (8, 8, 16), "4 heads of 32, 2 kv (session 23)": (4, 2, 32)}
BLOCKS = (512, 84, 56, 42)


def grads_fn(block: int, key_ok):
    def f(q, k, v, dout):
        out, vjp = jax.vjp(lambda q, k, v: layers.causal_attention(
            q, k, v, key_ok, block, cpu_block=layers.Policy().cpu_attention_block), q, k, v)
        return vjp(dout)

    return jax.jit(f)


def run(heads: tuple[int, int, int], reps: int) -> dict:
    n, kh, d = heads
    rng = np.random.default_rng(0)
    q, dout = (jnp.asarray(rng.standard_normal((BATCH, TOKENS, n, d), np.float32)) for _ in "qo")
    k, v = (jnp.asarray(rng.standard_normal((BATCH, TOKENS, kh, d), np.float32)) for _ in "kv")
    key_ok = jnp.asarray(np.arange(TOKENS)[None] < rng.integers(TOKENS * 8 // 10, TOKENS + 1,
                                                                  (BATCH, 1)))
    fns = {b: grads_fn(b, key_ok) for b in BLOCKS}
    grads = {b: jax.block_until_ready(f(q, k, v, dout)) for b, f in fns.items()}
    diff = {b: max(float(jnp.abs(x - y).max()) for x, y in zip(grads[b], grads[BLOCKS[0]]))
            for b in BLOCKS}
    _, median = timed_in_turn(
        {b: (lambda f=f: jax.block_until_ready(f(q, k, v, dout))) for b, f in fns.items()}, reps)
    return {str(b): dict(ms=1e3 * median[b], speedup=median[BLOCKS[0]] / median[b],
                         max_abs_diff=diff[b]) for b in BLOCKS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.default_backend()}; [{BATCH}, {TOKENS}] tokens, "
          f"forward + backward, milliseconds (medians of {args.reps})")
    results = {}
    for name, heads in HEADS.items():
        results[name] = r = run(heads, args.reps)
        print(f"{name:34s} " + "  ".join(
            f"block {b}: {r[str(b)]['ms']:5.1f} (x{r[str(b)]['speedup']:.2f}, "
            f"diff {r[str(b)]['max_abs_diff']:.0e})" for b in BLOCKS), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
