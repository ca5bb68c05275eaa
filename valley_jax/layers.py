"""Building blocks shared by the vision tower, the temporal modules and the decoder.

Every parameter carries the names of its logical axes in the variable metadata key `axes`
(e.g. ('embed', 'mlp')); `valley_jax.sharding` maps those names to mesh axes. Layers that are
repeated are created stacked (a leading 'layers' axis) and run with `scan_layers`, so compile
time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import functools
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
    # On CPU, softmax attention runs in spans of at most this many query rows with a written-out
    # backward (`blocked_attention`): 1.4-3.7x faster there (bench/attention.py). Other
    # backends ignore it; 0 runs jax.nn.dot_product_attention on the CPU too.
    cpu_attention_block: int = 256


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
              scale: float | None = None, cpu_block: int = 0) -> Array:
    """Softmax attention over [B, T, N, D] queries and [B, S, K, D] keys/values (N % K == 0).

    `mask` is a boolean [B or 1, 1, T, S] (True = attend; a query that sees no key attends to
    all alike). Scores are accumulated in float32. Other backends, and the CPU with
    `cpu_block=0`, run jax.nn.dot_product_attention; on the CPU with `cpu_block` > 0 it is
    `blocked_attention`: the same numbers, 1.4-3.7x faster there (bench/attention.py).
    """
    if mask is not None and (mask.ndim != 4 or mask.shape[1] != 1):
        raise ValueError(f"attention mask must be [B or 1, 1, T, S], got {mask.shape}")
    if not cpu_block or jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    b, t, n, d = q.shape
    kh = k.shape[2]
    g = n // kh
    # Head-major layout; a key group's G query heads stacked along the query axis, so that every
    # product is a plain batched matmul over [B, K].
    qt = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if mask is not None and g > 1:
        mask = jnp.tile(mask, (1, 1, g, 1))
    out = blocked_attention(qt, kt, vt, mask, d ** -0.5 if scale is None else scale, cpu_block)
    return out.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def _row_spans(rows: int, block: int) -> list[tuple[int, int]]:
    """[start, end) spans of about equal size, at most `block` rows each."""
    size = -(-rows // max(1, -(-rows // block)))
    return [(s, min(s + size, rows)) for s in range(0, rows, size)]


def _cat_rows(parts: list[Array]) -> Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, 2)


def _scores(q, k, mask, scale, s0, s1):
    s = jnp.einsum("bktd,bksd->bkts", q[:, :, s0:s1], k,
                   preferred_element_type=jnp.float32) * scale
    return s if mask is None else jnp.where(mask[:, :, s0:s1], s, -1e30)


def _blocked_forward(q, k, v, mask, scale, block):
    outs, maxes, totals = [], [], []
    for s0, s1 in _row_spans(q.shape[2], block):
        s = _scores(q, k, mask, scale, s0, s1)
        m = s.max(-1, keepdims=True)
        p = jnp.exp(s - m)
        total = p.sum(-1, keepdims=True)
        # Normalised after the product with v: [rows, D] divisions, not [rows, S].
        o = jnp.einsum("bkts,bksd->bktd", p.astype(v.dtype), v,
                       preferred_element_type=jnp.float32) / total
        outs.append(o.astype(q.dtype))
        maxes.append(m)
        totals.append(total)
    # The row maxima and sums, not their log-sum-exp: next to a masked row's -1e30 the log of
    # its sum would round away.
    return _cat_rows(outs), (_cat_rows(maxes), _cat_rows(totals))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float,
                      block: int) -> Array:
    """Softmax attention of head-major q [B, K, R, D] over k, v [B, K, S, D] (mask [B or 1, 1,
    R, S]), in spans of at most `block` query rows, each one matmul - softmax - matmul; the
    backward is written out from the saved row maxima and sums (as flash attention's), span by
    span.

    Why, on XLA:CPU: there a span's matmul - softmax - matmul fuses into one YNNPACK kernel that
    runs on one thread, and spans are independent, so they run side by side on the CPU's threads
    (the demo ViT's [64 images, 4 heads, 257, 257]: 47-52 ms in one piece, ~15 ms in two spans);
    and differentiating that forward gives a backward 1.4-1.8x slower than this one
    (bench/attention.py; BENCHMARKS.md, "Train step")."""
    return _blocked_forward(q, k, v, mask, scale, block)[0]


def _blocked_fwd(q, k, v, mask, scale, block):
    out, stats = _blocked_forward(q, k, v, mask, scale, block)
    return out, (q, k, v, mask, out, stats)


def _blocked_bwd(scale, block, res, dout):
    q, k, v, mask, out, (row_max, row_sum) = res
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    dqs, dk, dv = [], 0.0, 0.0
    for s0, s1 in _row_spans(q.shape[2], block):
        p = (jnp.exp(_scores(q, k, mask, scale, s0, s1) - row_max[:, :, s0:s1])
             * (1 / row_sum[:, :, s0:s1]))
        do = dout[:, :, s0:s1]
        dv = dv + jnp.einsum("bkts,bktd->bksd", p.astype(do.dtype), do,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bktd,bksd->bkts", do, v, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, :, s0:s1]) * scale
        if mask is not None:  # a masked score is a constant: no gradient (rows that see no key)
            ds = jnp.where(mask[:, :, s0:s1], ds, 0)
        ds = ds.astype(q.dtype)
        dqs.append(jnp.einsum("bkts,bksd->bktd", ds, k,
                              preferred_element_type=jnp.float32).astype(q.dtype))
        dk = dk + jnp.einsum("bkts,bktd->bksd", ds, q[:, :, s0:s1],
                             preferred_element_type=jnp.float32)
    return _cat_rows(dqs), dk.astype(k.dtype), dv.astype(v.dtype), None


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)


def causal_attention(q: Array, k: Array, v: Array, key_ok: Array, block: int, *,
                     cpu_block: int = 0) -> Array:
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
                              cpu_block=cpu_block))
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
