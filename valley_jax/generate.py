"""Generation: a jitted prefill, then decode steps over the KV cache, fused or streamed.

Two drivers share one prefill and one decode step, so they produce the same tokens:

- `generate`: the whole decode loop is one `lax.while_loop` inside the jit (batch evaluation:
  no host round trip per token);
- `stream`: a jitted single step called from Python, yielding each token as it is made (chat);
  the next step is dispatched before the current token is read, so the host's work overlaps
  the device's.

Prompts of different lengths are left-padded into one batch; RoPE positions count real tokens
only, so each prompt generates exactly what it would alone. Prompt and cache lengths are
rounded up to a few static buckets (`bucket`), and the sampling knobs and `max_new_tokens` are
traced values, so a chat session compiles a handful of times at most.

Sampling: greedy (temperature 0), or temperature with optional top-k and top-p, from a seed
(the key of output token i is `fold_in(key(seed), i)` in both drivers). A row stops at EOS (not
part of its output) or at a stop match (part of it, for the caller to cut its text; see
`cut_at_stop`). Stops are finite automata run on the device (`StopMatcher`): over token ids
(`stop_on_token_sequences`, e.g. the ids of "\\n###") or over the generated text
(`stop_on_strings`), which catches "###" however it is split into tokens, as the reference's
text-level stopping criterion does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valley_jax.llama import apply_rope, rope_frequencies

BUCKET = 64  # the smallest prompt and cache length


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0


def bucket(n: int) -> int:
    """The smallest of 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, ... (2^k and
    1.5 x 2^k) that holds n: at most 50 % padding, and a handful of sizes up to any context."""
    power = BUCKET
    while True:
        for size in (power, power * 3 // 2) if power > BUCKET else (power,):
            if size >= n:
                return size
        power *= 2


# ---------------------------------------------------------------------------------------------
# Stop matching


class StopMatcher(NamedTuple):
    """A finite automaton over generated tokens (Aho-Corasick over the stop patterns), as
    tables the decode step indexes on the device: from automaton state s, token t leads to
    `next_state[s, t]`, and `hit[s, t]` says a stop pattern ended inside t."""

    next_state: np.ndarray  # int32 [states, vocab]
    hit: np.ndarray  # bool [states, vocab]


def _aho_corasick(patterns: Sequence[Sequence]) -> tuple[list[dict], list[int], list[bool]]:
    """The trie of `patterns` (sequences of hashable symbols) with failure links and
    accepting states (a state accepts when a pattern ends there or on its failure chain)."""
    goto, fail, accept = [{}], [0], [False]
    for pattern in patterns:
        if not len(pattern):
            raise ValueError("empty stop pattern")
        state = 0
        for symbol in pattern:
            if symbol not in goto[state]:
                goto.append({})
                fail.append(0)
                accept.append(False)
                goto[state][symbol] = len(goto) - 1
            state = goto[state][symbol]
        accept[state] = True
    queue = list(goto[0].values())
    for state in queue:  # breadth first: a state's failure link is set before its children's
        for symbol, child in goto[state].items():
            f = fail[state]
            while f and symbol not in goto[f]:
                f = fail[f]
            fail[child] = goto[f][symbol] if symbol in goto[f] and goto[f][symbol] != child else 0
            accept[child] = accept[child] or accept[fail[child]]
            queue.append(child)
    return goto, fail, accept


def _matcher(patterns: Sequence[Sequence], token_symbols: Sequence[Sequence]) -> StopMatcher:
    """The automaton of `patterns` lifted from symbols to tokens: token t reads the symbols
    `token_symbols[t]` one after another."""
    goto, fail, accept = _aho_corasick(patterns)
    alphabet = {symbol for state in goto for symbol in state}

    def move(state, symbol):
        while state and symbol not in goto[state]:
            state = fail[state]
        return goto[state].get(symbol, 0)

    # A token without any pattern symbol leads every state back to the root, without a hit;
    # a token of no symbols at all (a special token: no text) leaves the state as it is.
    next_state = np.zeros((len(goto), len(token_symbols)), np.int32)
    hit = np.zeros((len(goto), len(token_symbols)), bool)
    for t, symbols in enumerate(token_symbols):
        if not len(symbols):
            next_state[:, t] = np.arange(len(goto))
        if not alphabet.intersection(symbols):
            continue
        for start in range(len(goto)):
            state, matched = start, False
            for symbol in symbols:
                state = move(state, symbol)
                matched = matched or accept[state]
            next_state[start, t], hit[start, t] = state, matched
    return StopMatcher(next_state, hit)


@functools.lru_cache(maxsize=32)
def _token_sequence_matcher(sequences: tuple[tuple[int, ...], ...], vocab_size: int) -> StopMatcher:
    return _matcher(sequences, [(t,) for t in range(vocab_size)])


def stop_on_token_sequences(sequences: Sequence[Sequence[int]], vocab_size: int) -> StopMatcher:
    """Stops a row when its tokens end with one of `sequences` (token ids)."""
    return _token_sequence_matcher(tuple(tuple(int(t) for t in s) for s in sequences), vocab_size)


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """The text each token id adds when it follows other text (special tokens add none; ids
    past the tokenizer, e.g. padded embedding rows, add none). Read off decoding the token after
    an anchor word, because sentencepiece drops a token's leading space at the start of a text."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    prefix = tokenizer.decode(anchor, skip_special_tokens=True)
    known = min(vocab_size, len(tokenizer))
    pairs = tokenizer.batch_decode([anchor + [t] for t in range(known)], skip_special_tokens=True)
    texts = [p[len(prefix):] if p.startswith(prefix) else tokenizer.decode([t])
             for t, p in enumerate(pairs)]
    return texts + [""] * (vocab_size - known)


def stop_on_strings(tokenizer, strings: Sequence[str], vocab_size: int) -> StopMatcher:
    """Stops a row as soon as its generated text contains one of `strings`, however the text
    is split into tokens (the reference's KeywordsStoppingCriteria checks the decoded text)."""
    return _matcher([tuple(s) for s in strings], token_texts(tokenizer, vocab_size))


def combine(matchers: Sequence[StopMatcher], vocab_size: int) -> StopMatcher:
    """One automaton that hits when any of `matchers` does (their product; none: one that never
    hits), its states padded to a power of two (at least 8), so that the usual stop
    configurations share one compilation."""
    next_state = np.zeros((1, vocab_size), np.int32)
    hit = np.zeros((1, vocab_size), bool)
    for m in matchers:
        if m.next_state.shape[1] != vocab_size:
            raise ValueError(f"a stop matcher for {m.next_state.shape[1]} tokens, not {vocab_size}")
        n = m.next_state.shape[0]  # product state (a, b) is a * n + b
        next_state = (next_state[:, None, :] * n + m.next_state[None, :, :]).reshape(-1, vocab_size)
        hit = (hit[:, None, :] | m.hit[None, :, :]).reshape(-1, vocab_size)
    states = max(8, 1 << (len(next_state) - 1).bit_length())
    pad = ((0, states - len(next_state)), (0, 0))
    return StopMatcher(np.pad(next_state, pad), np.pad(hit, pad))


def cut_at_stop(text: str, stop: str = "###") -> str:
    """The reference's clean-up: cut at the stop string, strip a leading 'Assistant:'."""
    text = text.split(stop)[0].strip()
    if text.startswith("Assistant:"):
        text = text[len("Assistant:"):].strip()
    return text


# ---------------------------------------------------------------------------------------------
# Sampling and the decode step (shared by both drivers)


class Knobs(NamedTuple):
    """Traced sampling values: changing them does not recompile."""

    temperature: jax.Array  # float32 scalar
    top_k: jax.Array  # int32 scalar, 0 = off
    top_p: jax.Array  # float32 scalar, 1 = off
    eos_id: jax.Array  # int32 scalar, -1 = none
    key: jax.Array  # PRNG key of the seed


def _knobs(sampling: SamplingConfig, eos_id: int | None) -> Knobs:
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
        raise ValueError(f"sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0, "
                         f"got {sampling}")
    return Knobs(jnp.float32(sampling.temperature), jnp.int32(sampling.top_k),
                 jnp.float32(sampling.top_p), jnp.int32(-1 if eos_id is None else eos_id),
                 jax.random.key(sampling.seed))


def argmax(x):
    """`jnp.argmax` over the last axis (the first index of the largest value, or of the first
    NaN), as a max and a min over a float iota: two reductions that XLA:CPU vectorises, where
    its argmax is one variadic reduction, ~5x slower over a 32000-word vocabulary (batch 8:
    0.64 against 0.13 ms, about 5 % of a decode step; BENCHMARKS.md "Generation")."""
    n = x.shape[-1]
    if n > 1 << 24:  # float32 counts exactly up to 2^24
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    top = jnp.max(x, axis=-1, keepdims=True)  # NaN-blind on XLA:CPU
    nan = jnp.isnan(x)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, x == top)
    first = jnp.min(jnp.where(hit, jnp.arange(n, dtype=jnp.float32), np.float32(n)), axis=-1)
    return first.astype(jnp.int32)


def sample_logits(logits, key, temperature, top_k, top_p, *, greedy: bool):
    """One token id per row from float32 logits [B, V]. Top-k keeps the logits at least the
    k-th largest; top-p then keeps the smallest set of the largest whose probability (after
    top-k) reaches top_p, the largest always kept; ties at a threshold stay in."""
    if greedy:
        return argmax(logits)
    vocab = logits.shape[-1]
    logits = logits / temperature
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    in_top_k = jnp.arange(vocab) < k
    desc = jnp.where(in_top_k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
    threshold = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Decoding(NamedTuple):
    """Per-row decode state after a token was sampled (the KV cache travels beside it)."""

    token: jax.Array  # int32 [B]: the token just sampled, fed to the next step
    emit: jax.Array  # bool [B]: `token` is output (not EOS, and the row had not finished)
    done: jax.Array  # bool [B]: the row has finished (EOS or stop match, this step or before)
    stop_state: jax.Array  # int32 [B]: state of the stop automaton
    pos: jax.Array  # int32 [B]: RoPE position of `token`
    step: jax.Array  # int32 scalar: index of `token` in the output


def _advance(dec: Decoding, logits, knobs: Knobs, stop: StopMatcher, greedy: bool) -> Decoding:
    step = dec.step + 1
    tok = sample_logits(logits, jax.random.fold_in(knobs.key, step), knobs.temperature,
                        knobs.top_k, knobs.top_p, greedy=greedy)
    is_eos = tok == knobs.eos_id
    hit = stop.hit[dec.stop_state, tok]
    return Decoding(token=tok, emit=~dec.done & ~is_eos, done=dec.done | is_eos | hit,
                    stop_state=stop.next_state[dec.stop_state, tok], pos=dec.pos + 1, step=step)


def decode_cache(cache: dict) -> dict:
    """`Llama`'s cache (k, v [layers, B, slots, kv_heads, head_dim]) in the decode layout: k and
    v as tuples of one [B * kv_heads, slots, head_dim] array per layer (see `_decode_forward`)."""
    layers, b, slots, kv_heads, head_dim = cache["k"].shape
    per_layer = lambda a: tuple(a[i].swapaxes(1, 2).reshape(b * kv_heads, slots, head_dim)
                                for i in range(layers))
    return dict(cache, k=per_layer(cache["k"]), v=per_layer(cache["v"]))


def _prefill_body(model, ids, mask, frames, frame_mask, knobs, stop, cache_len, greedy):
    """Runs the prompts into a fresh cache of `cache_len` slots and samples the first token.
    Returns the decode state and the cache in the decode layout (`decode_cache`)."""
    b = ids.shape[0]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = model.llm.init_cache(b, cache_len)
    h, cache = model.features(ids, frames, frame_mask, mask, positions=positions, cache=cache)
    start = Decoding(token=jnp.zeros((b,), jnp.int32), emit=jnp.zeros((b,), bool),
                     done=jnp.zeros((b,), bool), stop_state=jnp.zeros((b,), jnp.int32),
                     pos=positions[:, -1], step=jnp.int32(-1))
    return _advance(start, model.llm.logits(h[:, -1]), knobs, stop, greedy), decode_cache(cache)


def split_layers(llm) -> list:
    """The decoder's stacked layer weights as one state per layer: static slices of the stack."""
    _, states = nnx.split(llm.layers)
    return [jax.tree.map(lambda a, i=i: a[i], states) for i in range(llm.cfg.depth)]


def copied_layers(llm) -> list | None:
    """What a decode loop passes as `layers` to `_decode_forward`. XLA:CPU does not fuse a slice
    into a matrix product: a slice of the stacked weights taken inside the step is copied out of
    the stack on every token (BENCHMARKS.md "Generation"), so on the CPU the per-layer weights
    are copied once, before the loop. Elsewhere (None) the step slices the stack itself, so no
    second copy of the weights is held for the whole call (accelerator compilers can fuse the
    slice into its consumer; not measured here: no accelerator)."""
    return split_layers(llm) if jax.default_backend() == "cpu" else None


def _decode_forward(llm, token, pos, cache, layers=None):
    """Logits [B, V] of one new token per row (ids `token` [B] at RoPE positions `pos` [B]),
    and the cache with its keys and values written. `layers`: per-layer weights
    (`copied_layers`), or None to slice the stacked weights here.

    The cache is in the decode layout (`decode_cache`): one k and one v array per layer,
    [B * kv_heads, slots, head_dim]. A step writes one slot of each in place and the attention
    reads each once, in the order it is stored. Slower on the CPU (BENCHMARKS.md "Generation"):
    `Llama`'s layout, whose [B, slots, kv_heads, head_dim] slabs go in and out of the layer
    scan, so a step copied the whole cache (58M decoder, batch 8: 80-100 ms at 128 slots,
    0.9-1.3 s at 2048); one [layers, ...] array, whose layer slices XLA:CPU copies out before
    the attention's products; and [B, kv_heads, ...] per layer, where a batch of one became a
    reshape between the slot update and the attention and XLA copied the cache around it.
    The layers run unrolled; the arithmetic is the layer's own (norms, projections, RoPE), and
    tests/test_generate.py holds it to the full forward.
    """
    cfg = llm.cfg
    b, groups = token.shape[0], cfg.heads // cfg.kv_heads
    index = cache["index"]
    key_ok = jax.lax.dynamic_update_slice_in_dim(cache["mask"], jnp.ones((b, 1), bool), index,
                                                 axis=1)
    inv_freq = rope_frequencies(cfg)
    positions = pos[:, None]
    graphdef = nnx.graphdef(llm.layers)
    h = llm.embed_tokens(token[:, None])
    k_out, v_out = [], []
    for layer_state, k_cache, v_cache in zip(layers or split_layers(llm), cache["k"],
                                             cache["v"]):
        layer = nnx.merge(graphdef, layer_state)
        y = layer.attn_norm(h)
        q = apply_rope(layer.q(y), positions, inv_freq)  # [B, 1, heads, D]
        k = apply_rope(layer.k(y), positions, inv_freq)  # [B, 1, kv_heads, D]
        v = layer.v(y)
        k = k.swapaxes(1, 2).reshape(b * cfg.kv_heads, 1, cfg.head_dim)
        v = v.swapaxes(1, 2).reshape(b * cfg.kv_heads, 1, cfg.head_dim)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0))
        # Query head n reads kv head n // groups, as grouped-query attention does.
        q = q.reshape(b * cfg.kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("ngd,nsd->ngs", q, k_cache.astype(q.dtype),
                            preferred_element_type=jnp.float32).reshape(b, -1, key_ok.shape[1])
        scores = jnp.where(key_ok[:, None, :], scores / np.sqrt(cfg.head_dim), -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
        probs = probs.reshape(b * cfg.kv_heads, groups, -1)
        attended = jnp.einsum("ngs,nsd->ngd", probs, v_cache.astype(q.dtype))
        h = h + layer.o(attended.reshape(b, 1, cfg.heads, cfg.head_dim))
        y = layer.mlp_norm(h)
        h = h + layer.down(jax.nn.silu(layer.gate(y)) * layer.up(y))
        k_out.append(k_cache)
        v_out.append(v_cache)
    logits = llm.logits(llm.norm(h[:, -1]))
    return logits, dict(k=tuple(k_out), v=tuple(v_out), mask=key_ok, index=index + 1)


def _step_body(llm, dec: Decoding, cache, knobs, stop, greedy, layers=None):
    """Feeds the last token of every row through the decoder and samples the next one."""
    logits, cache = _decode_forward(llm, dec.token, dec.pos, cache, layers)
    return _advance(dec, logits, knobs, stop, greedy), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "greedy"))
def _prefill(graphdef, state, ids, mask, frames, frame_mask, knobs, stop, *, cache_len,
             greedy):
    return _prefill_body(nnx.merge(graphdef, state), ids, mask, frames, frame_mask, knobs,
                         stop, cache_len, greedy)


# The cache is donated: each step updates it in place instead of copying every layer's keys
# and values. The small per-row state is not, so it stays readable while the next step runs.
@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _step(graphdef, state, layers, dec, cache, knobs, stop, *, greedy):
    return _step_body(nnx.merge(graphdef, state), dec, cache, knobs, stop, greedy, layers)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _copied_layers(graphdef, state):
    return copied_layers(nnx.merge(graphdef, state))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "greedy"))
def _generate_fused(graphdef, state, ids, mask, frames, frame_mask, knobs, stop, max_new, *,
                    cache_len, greedy):
    model = nnx.merge(graphdef, state)
    dec, cache = _prefill_body(model, ids, mask, frames, frame_mask, knobs, stop, cache_len,
                               greedy)
    # p prompt slots + (n - 1) decode steps fit the cache: at most this many output tokens.
    room = cache_len - ids.shape[1] + 1
    out = jnp.zeros((ids.shape[0], room), jnp.int32).at[:, 0].set(dec.token)
    lengths = dec.emit.astype(jnp.int32)  # a row's output is a prefix: emit stays off once done
    layers = copied_layers(model.llm)

    def cond(carry):
        dec = carry[0]
        return (dec.step + 1 < max_new) & ~jnp.all(dec.done)

    def body(carry):
        dec, cache, out, lengths = carry
        dec, cache = _step_body(model.llm, dec, cache, knobs, stop, greedy, layers)
        out = jax.lax.dynamic_update_slice_in_dim(out, dec.token[:, None], dec.step, axis=1)
        return dec, cache, out, lengths + dec.emit

    _, _, out, lengths = jax.lax.while_loop(cond, body, (dec, cache, out, lengths))
    return out, lengths


# ---------------------------------------------------------------------------------------------
# Drivers


@dataclasses.dataclass(frozen=True)
class _Batch:
    ids: np.ndarray  # int32 [B, P], left-padded
    mask: np.ndarray  # bool [B, P]
    cache_len: int


def _batch(prompts: Sequence[np.ndarray], max_new_tokens: int) -> _Batch:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    p_len = bucket(max(len(p) for p in prompts))
    ids = np.zeros((len(prompts), p_len), np.int32)
    mask = np.zeros((len(prompts), p_len), bool)
    for row, prompt in enumerate(prompts):
        ids[row, p_len - len(prompt):] = prompt  # left padding
        mask[row, p_len - len(prompt):] = True
    return _Batch(ids, mask, bucket(p_len + max_new_tokens))


def _stop(model, stop_sequences, stop_matchers) -> StopMatcher:
    vocab = model.cfg.llm.vocab_size
    matchers = list(stop_matchers)
    sequences = [s for s in stop_sequences if len(s)]
    if sequences:
        matchers.append(stop_on_token_sequences(sequences, vocab))
    return StopMatcher(*map(jnp.asarray, combine(matchers, vocab)))


def generate(model, prompts: Sequence[np.ndarray], frames=None, frame_mask=None, *,
             sampling: SamplingConfig = SamplingConfig(), eos_id: int | None = None,
             stop_sequences: Sequence[Sequence[int]] = (),
             stop_matchers: Sequence[StopMatcher] = ()) -> list[list[int]]:
    """Generates for a batch of prompts (1-D int arrays of token ids, any lengths), the decode
    loop fused into one jitted call.

    frames: uint8 [B, T, S, S, 3] and frame_mask [B, T] for prompts with media (None: text).
    Returns the generated ids of each prompt, without the EOS, ending at the first EOS or stop
    match (a stop's tokens are kept, for the caller to cut its text).
    """
    batch = _batch(prompts, sampling.max_new_tokens)
    graphdef, state = nnx.split(model)
    out, lengths = _generate_fused(
        graphdef, state, batch.ids, batch.mask, frames, frame_mask, _knobs(sampling, eos_id),
        _stop(model, stop_sequences, stop_matchers), jnp.int32(sampling.max_new_tokens),
        cache_len=batch.cache_len, greedy=sampling.temperature == 0)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [row[:n].tolist() for row, n in zip(out, lengths)]


def stream(model, prompts: Sequence[np.ndarray], frames=None, frame_mask=None, *,
           sampling: SamplingConfig = SamplingConfig(), eos_id: int | None = None,
           stop_sequences: Sequence[Sequence[int]] = (),
           stop_matchers: Sequence[StopMatcher] = ()) -> Iterator[np.ndarray]:
    """As `generate`, one decode step at a time: yields, per step, an int array [B] holding
    each row's new output token, or -1 where the row made none (it has finished, or the token
    is its EOS). Ends when every row has finished or after max_new_tokens steps; the tokens
    other than -1 of a row are exactly what `generate` returns for it."""
    batch = _batch(prompts, sampling.max_new_tokens)
    greedy = sampling.temperature == 0
    knobs = _knobs(sampling, eos_id)
    stop = _stop(model, stop_sequences, stop_matchers)
    graphdef, state = nnx.split(model)
    dec, cache = _prefill(graphdef, state, batch.ids, batch.mask, frames, frame_mask, knobs,
                          stop, cache_len=batch.cache_len, greedy=greedy)
    llm_graphdef, llm_state = nnx.split(model.llm)  # a decode step needs the decoder only
    layers = _copied_layers(llm_graphdef, llm_state)
    for i in range(sampling.max_new_tokens):
        current = dec
        if i + 1 < sampling.max_new_tokens:
            # Dispatched before `current` is read: the device runs the next step meanwhile.
            dec, cache = _step(llm_graphdef, llm_state, layers, current, cache, knobs, stop,
                               greedy=greedy)
        token, emit, done = jax.device_get((current.token, current.emit, current.done))
        yield np.where(emit, token, -1)
        if done.all():
            return
