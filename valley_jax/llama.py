"""LLaMA-family decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention, KV cache.

The cache is an explicit pytree (`init_cache`), threaded through `__call__`, so prefill and
decode steps are pure functions that jit once per cache size:

    k, v   [layers, batch, max_len, kv_heads, head_dim]   keys/values by slot
    mask   [batch, max_len] bool                           slots that hold a real token
    index  int32 scalar                                    next free slot

A query in slot i attends to the filled slots j <= i; positions (for RoPE) are given per token,
so left-padded prompts of different lengths decode together.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from valley_jax.config import LlamaConfig
from valley_jax.layers import (Dense, Policy, RMSNorm, attention, causal_attention, normal, param,
                               run_stacked, stacked)
from valley_jax.sharding import constrain


def rope_frequencies(cfg: LlamaConfig) -> jnp.ndarray:
    """Inverse frequencies [head_dim // 2], with Hugging Face's 'linear' or 'llama3' scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return inv / s.factor
    if s.rope_type == "llama3":
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        mid = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_mid, mid, scaled)
    raise ValueError(f"unsupported rope scaling {s.rope_type!r}")


def apply_rope(x, positions, inv_freq):
    """x: [B, T, N, D]; positions: [B, T]. Rotates the two halves of D (Hugging Face layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, policy: Policy, rngs: nnx.Rngs):
        e, h, kv, hd, m = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
        lora = cfg.lora

        def dense(name, i, o, ia, oa):
            adapter = lora if lora is not None and name in lora.targets else None
            return Dense(i, o, ia, oa, use_bias=False, policy=policy, rngs=rngs, lora=adapter,
                         std=cfg.init_std)

        self.policy = policy
        self.attn_norm = RMSNorm(e, eps=cfg.rms_eps, policy=policy, rngs=rngs)
        self.q = dense("q", (e,), (h, hd), ("embed",), ("heads", "head_dim"))
        self.k = dense("k", (e,), (kv, hd), ("embed",), ("kv_heads", "head_dim"))
        self.v = dense("v", (e,), (kv, hd), ("embed",), ("kv_heads", "head_dim"))
        self.o = dense("o", (h, hd), (e,), ("heads", "head_dim"), ("embed",))
        self.mlp_norm = RMSNorm(e, eps=cfg.rms_eps, policy=policy, rngs=rngs)
        self.gate = dense("gate", (e,), (m,), ("embed",), ("mlp",))
        self.up = dense("up", (e,), (m,), ("embed",), ("mlp",))
        self.down = dense("down", (m,), (e,), ("mlp",), ("embed",))

    def __call__(self, x, positions, inv_freq, mask, kv=None, index=None, rng=None):
        """x: [B, T, E]. Without `kv`, attends causally over x itself (`mask` [B, T]: False at
        padding); with `kv` = (k, v) of this layer's cache slots [B, S, K, D], writes the new
        keys/values at slot `index` first and attends by `mask` [B, 1, T, S]. `rng`: LoRA
        dropout key (None = deterministic)."""
        r = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
        y = self.attn_norm(x)
        q = apply_rope(self.q(y, r[0]), positions, inv_freq)
        k = apply_rope(self.k(y, r[1]), positions, inv_freq)
        v = self.v(y, r[2])
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
        if kv is None:
            y = causal_attention(q, k, v, mask, self.policy.attention_block,
                                 cpu_block=self.policy.cpu_attention_block)
        else:
            y = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                          cpu_block=self.policy.cpu_attention_block)
        x = x + self.o(y, r[3])
        y = self.mlp_norm(x)
        x = x + self.down(jax.nn.silu(self.gate(y, r[4])) * self.up(y, r[5]), r[6])
        return x, (k, v)


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, policy: Policy, *, rngs: nnx.Rngs):
        self.cfg, self.policy = cfg, policy
        self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.hidden), ("vocab", "embed"),
                           policy.param_dtype)
        self.layers = stacked(lambda r: DecoderLayer(cfg, policy, r), cfg.depth, rngs)
        self.norm = RMSNorm(cfg.hidden, eps=cfg.rms_eps, policy=policy, rngs=rngs)
        self.lm_head = Dense((cfg.hidden,), (cfg.vocab_size,), ("embed",), ("vocab",),
                             use_bias=False, policy=policy, rngs=rngs, std=cfg.init_std)

    def embed_tokens(self, ids):
        return jnp.take(self.embed[...], ids, axis=0).astype(self.policy.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        c = self.cfg
        shape = (c.depth, batch, max_len, c.kv_heads, c.head_dim)
        dtype = dtype or self.policy.dtype
        return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    def __call__(self, x, positions, token_mask, cache=None, rng=None):
        """x: [B, T, E] input embeddings; positions: [B, T] int; token_mask: [B, T] bool (False =
        padding); rng: LoRA dropout key (None = deterministic). Returns float32 logits
        [B, T, vocab] and the updated cache (or None)."""
        h, cache = self.features(x, positions, token_mask, cache, rng)
        return self.logits(h), cache

    def logits(self, h):
        """float32 logits [..., vocab] of final hidden states `h` [..., E] (from `features`)."""
        return self.lm_head(h).astype(jnp.float32)

    def features(self, x, positions, token_mask, cache=None, rng=None):
        """As `__call__`, but returns the final (normed) hidden states [B, T, E] instead of the
        logits, so that a loss can run the lm_head on the positions it scores alone."""
        inv_freq = rope_frequencies(self.cfg)
        t = x.shape[1]
        if cache is None:
            index, key_ok = None, token_mask
            mask = token_mask  # causal attention over x itself, blockwise (layers.causal_attention)
        else:
            index = cache["index"]
            q_slot = index + jnp.arange(t)
            k_slot = jnp.arange(cache["mask"].shape[1])
            key_ok = jax.lax.dynamic_update_slice_in_dim(cache["mask"], token_mask, index, axis=1)
            causal = k_slot[None, :] <= q_slot[:, None]
            # A query always sees itself, so rows of padding never softmax over nothing.
            mask = (causal[None] & key_ok[:, None, :]) | (k_slot[None, None, :] == q_slot[None, :, None])
            mask = mask[:, None]  # [B, 1, T, S]

        def body(layer, h, xs):
            kv, layer_rng = xs
            h = constrain(h, ("activation_batch", None, None))
            h, new_kv = layer(h, positions, inv_freq, mask, kv, index, layer_rng)
            return h, (None if kv is None else new_kv)  # training keeps no per-layer k/v

        kv = None if cache is None else (cache["k"], cache["v"])
        use_rng = rng is not None and self.cfg.lora is not None and self.cfg.lora.dropout > 0
        layer_rngs = jax.random.split(rng, self.cfg.depth) if use_rng else None
        x, new_kv = run_stacked(self.layers, body, x, (kv, layer_rngs), self.policy)
        h = self.norm(x)
        if cache is None:
            return h, None
        return h, dict(k=new_kv[0], v=new_kv[1], mask=key_ok, index=index + t)
