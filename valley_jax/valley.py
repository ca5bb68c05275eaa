"""Valley: frozen CLIP ViT -> projector -> temporal module -> LLaMA decoder.

A batch may mix videos (T frames), images (one valid frame) and text-only samples (no valid
frame): shapes are static and the media features are placed into the input embeddings by a
gather, so the model jits once for a batch shape.

Token layout of one media placeholder (see valley_jax.tokens.media_tokens):

    <im_start> <im_patch> x N <im_end> <vi_start> <vi_frame> x n <vi_end>

The k-th <im_patch> of a sample takes the k-th temporally merged patch, the k-th <vi_frame>
takes the CLS feature of its k-th frame (both after the projector).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valley_jax import hf
from valley_jax.clip import CLIPVision
from valley_jax.config import ValleyConfig
from valley_jax.layers import Policy
from valley_jax.llama import Llama
from valley_jax.projector import Projector
from valley_jax.temporal import make_temporal


class Valley(nnx.Module):
    def __init__(self, cfg: ValleyConfig, policy: Policy = Policy(), *, rngs: nnx.Rngs):
        self.cfg, self.policy = cfg, policy
        self.vision = CLIPVision(cfg.vision, policy, rngs=rngs)
        self.projector = Projector(cfg.vision.width, cfg.llm.hidden, policy, rngs=rngs)
        self.temporal = make_temporal(cfg, policy, rngs)
        self.llm = Llama(cfg.llm, policy, rngs=rngs)

    def normalize(self, frames):
        """uint8 RGB [..., 3] -> CLIP-normalised values in the compute dtype. The last axis may
        also be a flattened patch whose channel runs fastest ([..., p * p * 3])."""
        if frames.dtype != jnp.uint8:
            raise TypeError(f"frames must be uint8 RGB, got {frames.dtype}")
        reps = frames.shape[-1] // 3
        mean, std = np.asarray(self.cfg.pixel_mean), np.asarray(self.cfg.pixel_std)
        # (x / 255 - mean) / std as one multiply-add: divisions cost more than the data movement.
        scale = jnp.asarray(np.tile(1 / (255 * std), reps), jnp.float32)
        shift = jnp.asarray(np.tile(mean / std, reps), jnp.float32)
        return (frames.astype(jnp.float32) * scale - shift).astype(self.policy.dtype)

    def encode_media(self, frames, frame_mask, *, rng=None, train_vision: bool = False):
        """frames: uint8 [B, T, S, S, 3]; frame_mask: bool [B, T].

        Returns merged patches [B, N, H] and per-frame tokens [B, T, H]."""
        b, t = frames.shape[:2]
        # Frames are folded into the batch axis for the ViT and unfolded after.
        # Patchified while still uint8, then normalised patch by patch (BENCHMARKS.md, "Train step").
        patches = self.vision.patchify(frames.reshape((b * t,) + frames.shape[2:]))
        feats = self.vision.encode(self.normalize(patches))
        if not train_vision:
            feats = jax.lax.stop_gradient(feats)
        feats = self.projector(feats)
        feats = feats.reshape((b, t) + feats.shape[1:])  # [B, T, 1 + N, H]
        patches = self.temporal(feats[:, :, 1:], frame_mask, rng=rng)
        return patches, feats[:, :, 0]

    def embed(self, input_ids, frames=None, frame_mask=None, *, rng=None, train_vision=False):
        """Input embeddings [B, S, H] with media features at the placeholder tokens."""
        text = self.llm.embed_tokens(input_ids)
        if frames is None:
            return text
        patches, frame_tokens = self.encode_media(frames, frame_mask, rng=rng,
                                                  train_vision=train_vision)
        n = patches.shape[1]
        table = jnp.concatenate([patches, frame_tokens.astype(patches.dtype)], axis=1)
        is_patch = input_ids == self.cfg.im_patch_id
        is_frame = input_ids == self.cfg.vi_frame_id
        row = jnp.where(is_patch, jnp.cumsum(is_patch, axis=1) - 1, n + jnp.cumsum(is_frame, axis=1) - 1)
        row = jnp.clip(row, 0, table.shape[1] - 1)
        media = jnp.take_along_axis(table, row[..., None], axis=1)
        return jnp.where((is_patch | is_frame)[..., None], media.astype(text.dtype), text)

    def __call__(self, input_ids, frames=None, frame_mask=None, attention_mask=None, *,
                 positions=None, cache=None, rng=None, train_vision: bool = False):
        """Logits [B, S, vocab] (float32) and the updated KV cache (None without one).

        input_ids: int [B, S]; frames: uint8 [B, T, S, S, 3] or None (text only, e.g. decode
        steps); frame_mask: bool [B, T]; attention_mask: [B, S], 1 = real token (default all);
        positions: [B, S] RoPE positions (default: count of real tokens before each token);
        rng: dropout key for the temporal transformer and LoRA (None = deterministic).
        """
        h, cache = self.features(input_ids, frames, frame_mask, attention_mask, positions=positions,
                                 cache=cache, rng=rng, train_vision=train_vision)
        return self.llm.logits(h), cache

    def features(self, input_ids, frames=None, frame_mask=None, attention_mask=None, *,
                 positions=None, cache=None, rng=None, train_vision: bool = False):
        """As `__call__`, but the decoder's final (normed) hidden states [B, S, H] instead of the
        logits: `llm.logits` turns any of them into logits (the train loss scores only the
        learned positions, generation only the last)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        temporal_rng, llm_rng = (None, None) if rng is None else jax.random.split(rng)
        x = self.embed(input_ids, frames, frame_mask, rng=temporal_rng, train_vision=train_vision)
        return self.llm.features(x, positions, attention_mask, cache, rng=llm_rng)


def fresh_variables(cfg: ValleyConfig, policy: Policy, seed: int, paths) -> dict:
    """{path: value} of the variables at `paths` as `Valley(cfg, policy, rngs=nnx.Rngs(seed))`
    initialises them, computed alone: one compiled program that keeps only their initialisers
    (a model made eagerly compiles every initialiser on its own, ~13 s for the demo's)."""
    paths = [tuple(p) for p in paths]
    if not paths:
        return {}

    def make():
        model_vars = hf.variables(Valley(cfg, policy, rngs=nnx.Rngs(seed)))
        return [model_vars[p][...] for p in paths]

    return dict(zip(paths, jax.device_get(jax.jit(make)())))
