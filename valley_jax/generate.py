"""Generation: a jitted prefill, then a jitted decode loop over the KV cache.

Prompts of different lengths are left-padded into one batch; RoPE positions count real tokens
only, so each prompt generates exactly what it would alone. Prompt and cache lengths are rounded
up to a few static buckets, so a session compiles a handful of times at most.

Sampling: greedy (temperature 0), or temperature with optional top-k and top-p, from a seed.
A row stops at EOS or when its tokens end with one of the stop sequences (e.g. the ids of
"###"); the text is cut at the stop string afterwards by the caller (see `cut_at_stop`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BUCKET = 64  # prompt and cache lengths are multiples of this


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0


def _round_up(n: int, m: int = BUCKET) -> int:
    return max(m, -(-n // m) * m)


def sample_logits(logits, rng, temperature: float, top_k: int, top_p: float):
    """One token id per row from float32 logits [B, V]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "cache_len", "temperature",
                                             "top_k", "top_p", "stop_seqs"))
def _generate(graphdef, state, ids, mask, frames, frame_mask, rng, *, max_new, cache_len,
              temperature, top_k, top_p, eos_id, stop_seqs):
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = model.llm.init_cache(b, cache_len)
    logits, cache = model(ids, frames, frame_mask, mask, positions=positions, cache=cache)
    next_pos = positions[:, -1] + 1
    longest_stop = max((len(s) for s in stop_seqs), default=1)
    out = jnp.zeros((b, max_new + longest_stop), jnp.int32)  # room for the stop-suffix check

    def stopped_by(out, i):
        hit = jnp.zeros((b,), bool)
        for seq in stop_seqs:
            n = len(seq)
            tail = jax.lax.dynamic_slice_in_dim(out, i + longest_stop - n + 1, n, axis=1)
            hit |= (i + 1 >= n) & jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1)
        return hit

    def body(carry):
        i, logits, cache, out, done, pos, rng = carry
        rng, key = jax.random.split(rng)
        tok = sample_logits(logits, key, temperature, top_k, top_p)
        tok = jnp.where(done, 0, tok)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i + longest_stop, axis=1)
        done = done | (tok == eos_id) | stopped_by(out, i)
        logits, cache = model(tok[:, None], attention_mask=jnp.ones((b, 1), bool),
                              positions=pos[:, None], cache=cache)
        return i + 1, logits[:, -1], cache, out, done, pos + 1, rng

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    init = (jnp.zeros((), jnp.int32), logits[:, -1], cache, out, jnp.zeros((b,), bool), next_pos, rng)
    i, _, _, out, done, _, _ = jax.lax.while_loop(cond, body, init)
    return out[:, longest_stop:], i


def generate(model, prompts: Sequence[np.ndarray], frames=None, frame_mask=None, *,
             sampling: SamplingConfig = SamplingConfig(), eos_id: int | None = None,
             stop_sequences: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """Generates for a batch of prompts (1-D int arrays of token ids, any lengths).

    frames: uint8 [B, T, S, S, 3] and frame_mask [B, T] for prompts with media (None: text).
    Returns the generated ids of each prompt, without the EOS, stopping at the first EOS or stop
    sequence (the stop sequence's ids are kept, for the caller to cut its text).
    """
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    p_len = _round_up(longest)
    cache_len = _round_up(p_len + sampling.max_new_tokens)
    ids = np.zeros((b, p_len), np.int32)
    mask = np.zeros((b, p_len), bool)
    for row, prompt in enumerate(prompts):
        ids[row, p_len - len(prompt):] = prompt  # left padding
        mask[row, p_len - len(prompt):] = True
    graphdef, state = nnx.split(model)
    out, steps = _generate(
        graphdef, state, ids, mask, frames, frame_mask, jax.random.key(sampling.seed),
        max_new=sampling.max_new_tokens, cache_len=cache_len,
        temperature=float(sampling.temperature), top_k=int(sampling.top_k),
        top_p=float(sampling.top_p), eos_id=-1 if eos_id is None else int(eos_id),
        stop_seqs=tuple(tuple(int(t) for t in s) for s in stop_sequences))
    out = np.asarray(out)[:, : int(steps)]
    results = []
    for row in out:
        tokens = []
        for t in row.tolist():
            if eos_id is not None and t == eos_id:
                break
            tokens.append(t)
            if any(len(s) and tokens[-len(s):] == list(s) for s in stop_sequences):
                break
        results.append(tokens)
    return results


def cut_at_stop(text: str, stop: str = "###") -> str:
    """The reference's clean-up: cut at the stop string, strip a leading 'Assistant:'."""
    text = text.split(stop)[0].strip()
    if text.startswith("Assistant:"):
        text = text[len("Assistant:"):].strip()
    return text
