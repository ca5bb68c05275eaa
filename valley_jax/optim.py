"""What trains in each stage, and the optimizer (AdamW, warm-up + cosine, global-norm clipping).

Parameters travel as one flat dict {path: array} (path = attribute names from the model root).
A `Trainable` splits it into the trained part, which alone gets gradients and optimizer state,
and the frozen rest:

  stage 1  the projector and the embedding rows of Valley's new tokens (rows >= `embed_rows_from`
           of llm.embed; the old rows, the rest of the LLM and the ViT are frozen)
  stage 2  projector, temporal module and LLM (and the ViT with `train_vision`)
  lora     stage 2 with the LLM frozen except its LoRA adapters (valley_jax.lora)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import optax

Path = tuple
EMBED = ("llm", "embed")


@dataclasses.dataclass(frozen=True)
class Trainable:
    paths: frozenset  # variables trained whole
    embed_rows_from: Optional[int] = None  # train only these rows of llm.embed (stage 1)

    def split(self, params: dict) -> tuple[dict, dict]:
        train = {p: v for p, v in params.items() if p in self.paths}
        frozen = {p: v for p, v in params.items() if p not in self.paths}
        if self.embed_rows_from is not None:
            train[EMBED] = params[EMBED][self.embed_rows_from:]
        return train, frozen

    def merge(self, train: dict, frozen: dict) -> dict:
        params = {**frozen, **train}
        if self.embed_rows_from is not None:
            old = frozen[EMBED][: self.embed_rows_from]
            params[EMBED] = jnp.concatenate([old, train[EMBED].astype(old.dtype)], axis=0)
        return params


def stage_trainable(stage: str, param_paths, *, embed_rows_from: int | None = None,
                    train_vision: bool = False) -> Trainable:
    """`param_paths`: the paths of the model's nnx.Param variables (buffers never train)."""
    paths = set(map(tuple, param_paths))
    if stage == "pretrain":
        if embed_rows_from is None:
            raise ValueError("stage 1 needs embed_rows_from: the first id of Valley's new tokens")
        return Trainable(frozenset(p for p in paths if p[0] == "projector"), embed_rows_from)
    if stage == "finetune":
        return Trainable(frozenset(p for p in paths if train_vision or p[0] != "vision"))
    if stage == "lora":
        return Trainable(frozenset(p for p in paths
                                   if p[0] in ("projector", "temporal") or "lora_a" in p
                                   or "lora_b" in p))
    raise ValueError(f"unknown stage {stage!r}: pretrain, finetune or lora")


def decays(path: Path) -> bool:
    """Weight decay applies to matrices, not to norm scales or biases (stacked layers make
    those 2-D, so decide by name, not by rank)."""
    return path[-1] not in ("bias", "scale")


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   grad_clip: float = 1.0, vision_lr_scale: float = 1.0):
    """AdamW with linear warm-up from 0 and cosine decay to 0 at `total_steps` (as Hugging Face's
    cosine schedule), after global-norm clipping. The ViT's updates (when it trains) are scaled
    by `vision_lr_scale`: its own learning rate as a multiple of `lr`, weight decay included, as
    a torch parameter group with its own lr (LLaVA-NeXT's `mm_vision_tower_lr`). Returns (optax
    transform, schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)
    mask = lambda params: {p: decays(p) for p in params}  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
    )
    if vision_lr_scale != 1.0:
        vision = lambda params: {p: p[0] == "vision" for p in params}  # noqa: E731
        tx = optax.chain(tx, optax.masked(optax.scale(vision_lr_scale), vision))
    return tx, schedule
