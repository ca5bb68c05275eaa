"""Building blocks shared by the vision tower, the temporal modules and the decoder.

Every parameter carries the names of its logical axes in the variable metadata key `axes`
(e.g. ('embed', 'mlp')); `valley_jax.sharding` maps those names to mesh axes. Layers that are
repeated are created stacked (a leading 'layers' axis) and run with `scan_layers`, so compile
time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a module computes: parameter and compute dtypes, layer scanning and rematerialisation."""

    dtype: Any = jnp.float32  # compute dtype of matmuls and activations
    param_dtype: Any = jnp.float32  # storage dtype of parameters (master weights)
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots | dots_no_batch
    # Causal self-attention runs in query blocks of this size, each over the keys up to its
    # end only: for long sequences about half the work of one fully masked attention.
    attention_block: int = 512
    # On CPU, softmax attention runs over the batch in chunks whose float32 scores take at most
    # about this many bytes, so that they stay in cache: 3-4x faster at ViT sizes (BENCHMARKS.md,
    # "Train step"). Other backends run it in one piece; 0 turns chunking off everywhere.
    cpu_attention_chunk_bytes: int = 2 << 20


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute everything
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param(rngs: nnx.Rngs, init: Callable, shape, axes, dtype) -> nnx.Param:
    """A parameter initialised with `init(key, shape, dtype)` that names its logical axes."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    return nnx.Param(init(rngs.params(), shape, dtype), axes=tuple(axes))


normal = lambda std: jax.nn.initializers.normal(stddev=std)  # noqa: E731
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def _contract(x: Array, kernel: Array, n: int) -> Array:
    """x [..., *in] @ kernel [*in, *out] over the last n axes of x."""
    return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))),
                                           ((), ())))


class Dense(nnx.Module):
    """y = x @ kernel (+ bias), contracting the last `len(in_shape)` axes of x.

    Kernels keep their head structure (e.g. [embed, heads, head_dim]) so that heads can be
    sharded by name. With `lora` (a LoraConfig), a low-rank adapter is added:
    y += dropout(x) @ lora_a @ lora_b * alpha / rank, with lora_b starting at zero (as PEFT).
    """

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, use_bias: bool, policy: Policy,
                 rngs: nnx.Rngs, std: float = 0.02, lora=None):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.n_in = len(in_shape)
        self.policy = policy
        self.kernel = param(rngs, normal(std), in_shape + out_shape, tuple(in_axes) + tuple(out_axes),
                            policy.param_dtype)
        self.bias = (param(rngs, zeros, out_shape, out_axes, policy.param_dtype)
                     if use_bias else None)
        self.lora = lora
        if lora is not None:
            bound = 1.0 / math.sqrt(math.prod(in_shape))  # PEFT's kaiming_uniform(a=sqrt(5))
            init_a = lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound)  # noqa: E731
            self.lora_a = param(rngs, init_a, in_shape + (lora.rank,), tuple(in_axes) + (None,),
                                policy.param_dtype)
            self.lora_b = param(rngs, zeros, (lora.rank,) + out_shape, (None,) + tuple(out_axes),
                                policy.param_dtype)

    def __call__(self, x: Array, rng: Array | None = None) -> Array:
        dtype = self.policy.dtype
        x = x.astype(dtype)
        y = _contract(x, self.kernel[...].astype(dtype), self.n_in)
        if self.lora is not None:
            h = _contract(dropout(x, self.lora.dropout, rng), self.lora_a[...].astype(dtype), self.n_in)
            y = y + _contract(h, self.lora_b[...].astype(dtype), 1) * (self.lora.alpha / self.lora.rank)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32."""

    def __init__(self, dim: int, *, eps: float, policy: Policy, rngs: nnx.Rngs, axis_name="norm"):
        self.eps = eps
        self.policy = policy
        self.scale = param(rngs, ones, (dim,), (axis_name,), policy.param_dtype)
        self.bias = param(rngs, zeros, (dim,), (axis_name,), policy.param_dtype)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.policy.dtype)


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm: normalise in float32, cast back, then scale (as Hugging Face does)."""

    def __init__(self, dim: int, *, eps: float, policy: Policy, rngs: nnx.Rngs):
        self.eps = eps
        self.policy = policy
        self.scale = param(rngs, ones, (dim,), ("norm",), policy.param_dtype)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.policy.dtype) * y.astype(self.policy.dtype)


def attention(q: Array, k: Array, v: Array, mask: Array | None = None, *,
              scale: float | None = None, chunk_bytes: int = 0) -> Array:
    """Softmax attention over [B, T, N, D] queries and [B, S, K, D] keys/values (N % K == 0).

    `mask` is a boolean [B or 1, 1, T, S] (True = attend). Grouped-query attention is handled
    by jax.nn.dot_product_attention; scores are accumulated in float32. With `chunk_bytes` (and
    only on the CPU backend), the batch runs in chunks of rows whose scores fit that size, one
    chunk after the other: the same arithmetic, with the [rows, N, T, S] scores in cache.
    """
    def run(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")

    b, t, n = q.shape[:3]
    chunks = 1
    if chunk_bytes and jax.default_backend() == "cpu":
        row_bytes = n * t * k.shape[1] * 4
        chunks = next((c for c in range(1, b + 1) if b % c == 0 and b // c * row_bytes <= chunk_bytes), b)
    if chunks == 1:
        return run(q, k, v, mask)
    # Chunk j takes rows j, j + chunks, ...: a batch sharded in contiguous blocks keeps every
    # chunk spread over all its shards.
    split = lambda x: jnp.swapaxes(x.reshape((b // chunks, chunks) + x.shape[1:]), 0, 1)  # noqa: E731
    shared = mask is not None and mask.shape[0] == 1
    xs = (split(q), split(k), split(v), None if mask is None or shared else split(mask))
    out = jax.lax.map(lambda a: run(a[0], a[1], a[2], mask if shared else a[3]), xs)
    return jnp.swapaxes(out, 0, 1).reshape(q.shape[:3] + v.shape[3:])


def causal_attention(q: Array, k: Array, v: Array, key_ok: Array, block: int, *,
                     chunk_bytes: int = 0) -> Array:
    """Causal self-attention of T queries over the same T keys, block by block: queries
    [start, end) attend to keys [0, end). `key_ok` [B, T] is False at padding; a query always
    sees itself, so padding rows never softmax over nothing."""
    t = q.shape[1]
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        q_pos = jnp.arange(start, end)[:, None]
        k_pos = jnp.arange(end)[None, :]
        mask = ((k_pos <= q_pos)[None] & key_ok[:, None, :end]) | (k_pos == q_pos)[None]
        outs.append(attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, None],
                              chunk_bytes=chunk_bytes))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """Creates `n` independently initialised copies of a layer as one module with a leading
    'layers' axis on every parameter."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n)
    def create(rngs):
        return make(rngs)

    module = create(rngs)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and var.has_metadata("axes"):
            var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))
    return module


def run_stacked(layers: nnx.Module, body: Callable, carry, xs, policy: Policy):
    """Applies the stacked `layers` in order: `carry, y = body(layer, carry, x)` for each layer,
    where `x` is the layer's slice of `xs` (any pytree with a leading layer axis, or None).

    Scanned (one compiled layer) or unrolled, by `policy.scan_layers`; rematerialised by
    `policy.remat`. Returns the final carry and the stacked `y`s.
    """
    graphdef, state = nnx.split(layers)

    def step(carry, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if policy.remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[policy.remat], prevent_cse=not policy.scan_layers)
    if policy.scan_layers:
        return jax.lax.scan(step, carry, (state, xs))
    n = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(n):
        carry, y = step(carry, jax.tree.map(lambda a: a[i], (state, xs)))
        ys.append(y)
    ys = None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys)
    return carry, ys


class Buffer(nnx.Variable):
    """A fixed tensor stored with the model (the v3 position table): checkpointed, never trained."""


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; the identity when `rng` is None (evaluation) or `rate` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
