"""The train step: loss over learned tokens, gradient accumulation, clipping, AdamW; jitted with
explicit shardings and donation.

    state, metrics = step(state, batch, rng)

`state.params` is the flat {path: array} of every model variable; `state.opt_state` covers only
the trained part (optim.Trainable), so frozen parameters hold no optimizer state. `batch` is the
data pipeline's dict (input_ids, labels, attention_mask, frames, frame_mask) for the global
batch; with `micro_batches = k` it is cut into k micro-batches inside the step and the gradient
is the exact token-weighted mean over all of them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from valley_jax import sharding
from valley_jax.optim import Trainable
from valley_jax.tokens import IGNORE_INDEX


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: Any


def split_model(model: nnx.Module):
    """(graphdef, flat params {path: array}, axes {path: logical axes}, Param paths)."""
    graphdef, state = nnx.split(model)
    params, axes, param_paths = {}, {}, []
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        params[path] = var.get_value()
        axes[path] = tuple(var.get_metadata().get("axes", (None,) * len(var.shape)))
        if isinstance(var, nnx.Param):
            param_paths.append(path)
    return graphdef, params, axes, param_paths


def merge_model(graphdef, params: dict) -> nnx.Module:
    return nnx.merge(graphdef, nnx.State.from_flat_path(params))


def shift_labels(labels):
    """Next-token targets: `labels` is aligned with the inputs (IGNORE_INDEX = not learned) and
    position t predicts label t + 1. The labels are shifted rather than the logits, which would
    copy the largest activation of the step."""
    return jnp.concatenate(
        [labels[:, 1:], jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)], axis=1)


def _xent_sum(logits, targets):
    learned = targets != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(learned, targets, 0))
    return jnp.sum(jnp.where(learned, losses, 0.0))


def cross_entropy(logits, labels):
    """Sum of next-token cross-entropy over learned tokens, and their count (see shift_labels)."""
    targets = shift_labels(labels)
    return _xent_sum(logits, targets), jnp.sum(targets != IGNORE_INDEX).astype(jnp.int32)


def learned_token_loss(hidden, logits_fn, labels, max_learned: int = 0):
    """`cross_entropy` from the decoder's final hidden states [B, S, H]: `logits_fn` (the
    lm_head) runs only on the learned positions, at most `max_learned` per sequence, gathered in
    order. A batch with a longer row (or max_learned = 0) takes every position's logits; the
    loss and its gradient are the same either way. An answer is a small share of a sequence
    (the demo's: ~10 of ~140 tokens), so this skips most of the lm_head and its softmax."""
    targets = shift_labels(labels)
    learned = targets != IGNORE_INDEX
    count = jnp.sum(learned).astype(jnp.int32)

    def every_position(hidden):
        return _xent_sum(logits_fn(hidden), targets)

    if not 0 < max_learned < hidden.shape[1]:
        return every_position(hidden), count

    def learned_positions(hidden):
        # A stable sort of "not learned" puts each row's learned positions first, in order.
        pos = jnp.argsort(~learned, axis=1, stable=True)[:, :max_learned]
        rows = jnp.take_along_axis(hidden, pos[..., None], axis=1)
        return _xent_sum(logits_fn(rows), jnp.take_along_axis(targets, pos, axis=1))

    fits = jnp.all(jnp.sum(learned, axis=1) <= max_learned)
    return jax.lax.cond(fits, learned_positions, every_position, hidden), count


def make_step(graphdef, trainable: Trainable, tx: optax.GradientTransformation,
              schedule: Callable, *, micro_batches: int = 1, train_vision: bool = False,
              max_learned: int = 0, mesh: Mesh | None = None):
    """The (unjitted) train step; see `jit_step`. `max_learned`: see `learned_token_loss`."""

    def loss_fn(train, frozen, batch, rng):
        model = merge_model(graphdef, trainable.merge(train, frozen))
        hidden, _ = model.features(batch["input_ids"], batch["frames"], batch["frame_mask"],
                                   batch["attention_mask"], rng=rng, train_vision=train_vision)
        return learned_token_loss(hidden, model.llm.logits, batch["labels"], max_learned)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(train, frozen, batch, rng):
        k = micro_batches
        if k == 1:
            (loss_sum, count), grads = grad_fn(train, frozen, batch, rng)
            return grads, loss_sum, count

        # Micro-batch m takes rows m, m + k, ...: each device's contiguous share of the global
        # batch splits evenly into the k micro-batches, so no data moves between devices.
        def cut(x):
            x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        def body(carry, inputs):
            g_sum, l_sum, n_sum = carry
            mb, i = inputs
            (l, n), g = grad_fn(train, frozen, mb, None if rng is None else jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, n_sum + n), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), train)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, loss_sum, count), _ = jax.lax.scan(
            body, init, (jax.tree.map(cut, batch), jnp.arange(k)))
        return grads, loss_sum, count

    def step(state: TrainState, batch: dict, rng):
        with sharding.activation_rules(mesh) if mesh is not None else contextlib.nullcontext():
            train, frozen = trainable.split(state.params)
            grads, loss_sum, count = accumulate(train, frozen, batch, rng)
            denom = jnp.maximum(count, 1).astype(jnp.float32)
            grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, train)
            grad_norm = optax.global_norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, train)
            train = optax.apply_updates(train, updates)
            metrics = dict(loss=loss_sum / denom, tokens=count, grad_norm=grad_norm,
                           lr=schedule(state.step))
            new = TrainState(state.step + 1, trainable.merge(train, frozen), opt_state)
        return new, metrics

    return step


def init_state(params: dict, trainable: Trainable, tx) -> TrainState:
    train, _ = trainable.split(params)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(train))


def tree_shardings(tree, axes: dict, mesh: Mesh):
    """Shardings for a pytree whose dict leaves are keyed by parameter path (params, optimizer
    moments): each such leaf is sharded by its parameter's logical axes; other leaves (step
    counters, scalars) are replicated."""

    def one(keypath, leaf):
        key = keypath[-1].key if keypath and hasattr(keypath[-1], "key") else None
        if isinstance(key, tuple) and key in axes and len(axes[key]) == len(leaf.shape):
            return NamedSharding(mesh, sharding.spec(axes[key], leaf.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def jit_step(step, state_shardings, batch_shardings, mesh: Mesh):
    """jax.jit with explicit in/out shardings; the state's buffers are donated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
