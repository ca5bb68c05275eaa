"""Valley's temporal modules: merge projected patch features over the frames of a video.

All take patches [B, T, N, H] (N = 256 patches per frame, already projected to the LLM width)
and a frame mask [B, T] (padding frames are False: an image is a video with one valid frame),
and return [B, N, H].

  mean         v1: average over the valid frames.
  importance   v2: Linear(N*H -> 1) scores each frame from its flattened patches; softmax over
               the valid frames; weighted sum.
  transformer  v3: each patch position is a sequence over time; add a fixed position table;
               one post-norm encoder layer (PyTorch nn.TransformerEncoderLayer: 8 heads, ReLU
               FFN, LayerNorm eps 1e-5, dropout); output at the last valid frame plus the mean of
               the patches without the position table. Only that frame's output is computed
               (every frame's keys and values, one query): the same numbers, less work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valley_jax.config import ValleyConfig
from valley_jax.layers import Buffer, Dense, LayerNorm, Policy, dropout, param

NEG_INF = -1e30


def masked_mean(patches, frame_mask):
    m = frame_mask.astype(patches.dtype)[:, :, None, None]
    count = jnp.maximum(m.sum(axis=1), 1)  # text-only samples have no frames: keep zeros
    return (patches * m).sum(axis=1) / count


class MeanPooling(nnx.Module):
    def __call__(self, patches, frame_mask, rng=None):
        return masked_mean(patches, frame_mask)


class ImportancePooling(nnx.Module):
    def __init__(self, num_patches: int, width: int, policy: Policy, *, rngs: nnx.Rngs):
        self.policy = policy
        # torch's Linear(N*H, 1) weight is [1, N*H] over the row-major flattening of [N, H].
        bound = (num_patches * width) ** -0.5
        init = lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound)  # noqa: E731
        self.kernel = param(rngs, init, (num_patches, width), (None, "embed"), policy.param_dtype)
        self.bias = param(rngs, init, (1,), (None,), policy.param_dtype)

    def __call__(self, patches, frame_mask, rng=None):
        scores = jnp.einsum("btnh,nh->bt", patches.astype(jnp.float32),
                            self.kernel[...].astype(jnp.float32)) + self.bias[0].astype(jnp.float32)
        weights = jax.nn.softmax(jnp.where(frame_mask, scores, NEG_INF), axis=1)
        weights = jnp.where(frame_mask, weights, 0)  # text-only rows: all zero, not uniform
        return jnp.einsum("bt,btnh->bnh", weights, patches.astype(jnp.float32)).astype(patches.dtype)


def sinusoid_table(length: int, width: int) -> np.ndarray:
    """The reference's getPositionEncoding: sin on even columns, cos on odd, base 10000."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    i = np.arange(width // 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, 2 * i / width)
    table = np.zeros((length, width), np.float32)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)
    return table


class TransformerDelta(nnx.Module):
    def __init__(self, cfg: ValleyConfig, policy: Policy, *, rngs: nnx.Rngs):
        h, heads, m = cfg.llm.hidden, cfg.temporal_heads, cfg.temporal_mlp_dim
        if h % heads:
            raise ValueError(f"LLM width {h} is not divisible by {heads} temporal heads")
        hd = h // heads
        self.rate = cfg.temporal_dropout
        self.policy = policy
        self.position = Buffer(jnp.asarray(sinusoid_table(cfg.temporal_max_frames, h),
                                           policy.param_dtype), axes=(None, "embed"))
        dense = lambda i, o, ia, oa: Dense(i, o, ia, oa, use_bias=True, policy=policy, rngs=rngs,  # noqa: E731
                                           std=h ** -0.5)
        self.q = dense((h,), (heads, hd), ("embed",), ("heads", "head_dim"))
        self.k = dense((h,), (heads, hd), ("embed",), ("heads", "head_dim"))
        self.v = dense((h,), (heads, hd), ("embed",), ("heads", "head_dim"))
        self.o = dense((heads, hd), (h,), ("heads", "head_dim"), ("embed",))
        self.norm1 = LayerNorm(h, eps=1e-5, policy=policy, rngs=rngs)
        self.linear1 = dense((h,), (m,), ("embed",), ("mlp",))
        self.linear2 = dense((m,), (h,), ("mlp",), ("embed",))
        self.norm2 = LayerNorm(h, eps=1e-5, policy=policy, rngs=rngs)

    def __call__(self, patches, frame_mask, rng=None):
        b, t, n, h = patches.shape
        rngs = [None] * 4 if rng is None else list(jax.random.split(rng, 4))
        x = patches + self.position[:t].astype(patches.dtype)[None, :, None, :]
        x = jnp.swapaxes(x, 1, 2)  # [B, N, T, H]: one sequence over time per patch position
        # Only the output at the last valid frame is kept. Keys and values need every frame; the
        # query, the residuals, the norms and the feed-forward part only that one: the same
        # numbers as running the layer over all frames, with a fraction of the work.
        last = jnp.maximum(frame_mask.sum(axis=1) - 1, 0)  # last valid frame of each sample
        # A one-hot sum rather than take_along_axis: its backward is a broadcast, not a scatter
        # (on the demo's CPU step no slower: 0.22 s either way, the scatter's runs noisier).
        pick = jax.nn.one_hot(last, t, dtype=x.dtype)[:, None, :, None]
        x_last = (x * pick).sum(axis=2, keepdims=True)  # [B, N, 1, H]
        q, k, v = self.q(x_last), self.k(x), self.v(x)  # [B, N, 1 | T, heads, hd]
        scores = jnp.einsum("bntkd,bnskd->bnkts", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
        scores = jnp.where(frame_mask[:, None, None, None, :], scores, NEG_INF)
        probs = dropout(jax.nn.softmax(scores, axis=-1).astype(q.dtype), self.rate, rngs[0])
        y = self.o(jnp.einsum("bnkts,bnskd->bntkd", probs, v))
        x = self.norm1(x_last + dropout(y, self.rate, rngs[1]))
        y = self.linear2(dropout(jax.nn.relu(self.linear1(x)), self.rate, rngs[2]))
        delta = self.norm2(x + dropout(y, self.rate, rngs[3]))[:, :, 0]  # [B, N, H]
        has_frames = frame_mask.any(axis=1)[:, None, None]
        return jnp.where(has_frames, delta, 0).astype(patches.dtype) + masked_mean(patches, frame_mask)


def make_temporal(cfg: ValleyConfig, policy: Policy, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.temporal == "mean":
        return MeanPooling()
    if cfg.temporal == "importance":
        return ImportancePooling(cfg.vision.num_patches, cfg.llm.hidden, policy, rngs=rngs)
    return TransformerDelta(cfg, policy, rngs=rngs)

