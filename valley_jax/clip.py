"""CLIP vision transformer (ViT-L/14 in Valley), as Hugging Face's CLIPVisionModel computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from valley_jax.config import VisionConfig
from valley_jax.layers import (Dense, LayerNorm, Policy, attention, normal, param, run_stacked,
                               stacked)
from valley_jax.sharding import constrain


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig, policy: Policy, rngs: nnx.Rngs):
        d, h = cfg.width, cfg.heads
        hd = d // h
        self.scale = hd ** -0.5
        self.cpu_block = policy.cpu_attention_block
        std = cfg.init_std
        qkv = lambda: Dense((d,), (h, hd), ("embed",), ("heads", "head_dim"), use_bias=True,  # noqa: E731
                            policy=policy, rngs=rngs, std=std)
        self.ln1 = LayerNorm(d, eps=cfg.layer_norm_eps, policy=policy, rngs=rngs)
        self.q, self.k, self.v = qkv(), qkv(), qkv()
        self.o = Dense((h, hd), (d,), ("heads", "head_dim"), ("embed",), use_bias=True, policy=policy,
                       rngs=rngs, std=std)
        self.ln2 = LayerNorm(d, eps=cfg.layer_norm_eps, policy=policy, rngs=rngs)
        self.fc1 = Dense((d,), (cfg.mlp_dim,), ("embed",), ("mlp",), use_bias=True, policy=policy,
                         rngs=rngs, std=std)
        self.fc2 = Dense((cfg.mlp_dim,), (d,), ("mlp",), ("embed",), use_bias=True, policy=policy,
                         rngs=rngs, std=std)

    def __call__(self, x):
        y = self.ln1(x)
        y = attention(self.q(y), self.k(y), self.v(y), scale=self.scale,
                      cpu_block=self.cpu_block)
        x = x + self.o(y)
        return x + self.fc2(quick_gelu(self.fc1(self.ln2(x))))


class CLIPVision(nnx.Module):
    """Patch embedding + class token + positions -> pre_layrnorm -> encoder layers.

    `__call__` returns the hidden state selected by `cfg.select_layer` for every token
    (class token first), so only the layers needed for it are run. `post_layernorm` is kept so
    that checkpoints round-trip, but Valley never applies it.
    """

    def __init__(self, cfg: VisionConfig, policy: Policy, *, rngs: nnx.Rngs):
        self.cfg, self.policy = cfg, policy
        p, d = cfg.patch_size, cfg.width
        self.patch_embed = param(rngs, normal(cfg.init_std), (p, p, 3, d), (None, None, None, "embed"),
                                 policy.param_dtype)
        self.class_embed = param(rngs, normal(cfg.init_std), (d,), ("embed",), policy.param_dtype)
        self.pos_embed = param(rngs, normal(cfg.init_std), (cfg.num_patches + 1, d), (None, "embed"),
                               policy.param_dtype)
        self.pre_ln = LayerNorm(d, eps=cfg.layer_norm_eps, policy=policy, rngs=rngs)
        self.layers = stacked(lambda r: EncoderLayer(cfg, policy, r), cfg.depth, rngs)
        self.post_ln = LayerNorm(d, eps=cfg.layer_norm_eps, policy=policy, rngs=rngs)

    def patchify(self, images):
        """[N, H, W, 3] -> [N, num_patches, p * p * 3], each patch flattened as (row, column,
        channel): the patch embedding is then one matmul (the same sums as the stride-p
        convolution). Any dtype: Valley patchifies uint8 frames before normalising them, a
        quarter of the bytes to move."""
        n, h, w, c = images.shape
        p = self.cfg.patch_size
        x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def embed(self, patches):
        """Normalised patches [N, num_patches, p * p * 3] -> [N, 1 + num_patches, width] before
        pre_layrnorm."""
        dtype = self.policy.dtype
        kernel = self.patch_embed[...].astype(dtype)
        x = jnp.einsum("npk,kd->npd", patches.astype(dtype), kernel.reshape(-1, kernel.shape[-1]))
        cls = jnp.broadcast_to(self.class_embed[...].astype(dtype), (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(dtype)

    def __call__(self, pixels):
        """Normalised pixels [N, H, W, 3] -> the selected hidden state [N, 1 + num_patches, width]."""
        return self.encode(self.patchify(pixels))

    def encode(self, patches):
        """Normalised patches (see `patchify`) -> the selected hidden state."""
        x = self.pre_ln(self.embed(patches))
        n = self.cfg.layers_to_run
        if n == 0:
            return x
        # Layers past the selected one are never run: slice them off before scanning.
        layers = self.layers
        if n < self.cfg.depth:
            graphdef, state = nnx.split(self.layers)
            layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:n], state))
        def body(layer, h, _):
            return layer(constrain(h, ("activation_batch", None, None))), None

        x, _ = run_stacked(layers, body, x, None, self.policy)
        return x
