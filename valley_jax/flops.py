"""Analytic FLOPs of one Valley train step (matmuls only, 2 FLOPs per multiply-add), for MFU.

Backward costs depend on what trains. A matmul y = x @ W costs F forward; its backward costs F for
the input gradient (needed whenever anything below it trains) and F for the weight gradient
(needed when W trains). So:

  ViT        forward only while frozen: nothing below it trains (3F when it trains)
  projector  forward + weight gradient (+ input gradient when the ViT trains)
  temporal   forward + input gradient (+ weight gradient in stage 2)
  LLM        stage 1: forward + input gradients (the projector below trains; the new embedding
             rows need no matmul); stage 2: forward + input + weight gradients; LoRA: forward +
             input gradients + the adapters' own costs
Attention score and mixing matmuls have no weights: they cost 2F backward whenever anything
below them trains. Rematerialisation is not counted (these are model FLOPs, as MFU wants).
"""

from __future__ import annotations

from valley_jax.config import ValleyConfig


def _passes(trains_weights: bool, needs_input_grad: bool) -> int:
    return 1 + int(trains_weights) + int(needs_input_grad)


def step_flops(cfg: ValleyConfig, *, batch: int, seq_len: int, num_frames: int, stage: str,
               train_vision: bool = False) -> dict:
    """FLOPs of one train step on `batch` sequences of `seq_len` tokens with `num_frames`
    frames each, broken down by part; 'total' is their sum."""
    v, m = cfg.vision, cfg.llm
    stage2 = stage in ("finetune", "lora")
    images = batch * num_frames
    n_tok = v.num_patches + 1

    # ViT: patch embedding + the layers that produce the selected hidden state.
    d = v.width
    vit_weights = 2 * images * (v.num_patches * v.patch_size ** 2 * 3 * d
                                + v.layers_to_run * n_tok * (4 * d * d + 2 * d * v.mlp_dim))
    vit_attn = 2 * images * v.layers_to_run * 2 * n_tok * n_tok * d
    vit = (vit_weights + vit_attn) * (3 if train_vision else 1)

    h = m.hidden
    projector = 2 * images * n_tok * d * h * _passes(True, train_vision)

    # Temporal module, on the projected patches.
    b, t, n = batch, num_frames, v.num_patches
    temporal_trains = stage2
    if cfg.temporal == "mean":
        temporal = 0
    elif cfg.temporal == "importance":
        # Scores (a weight matmul) and the weighted sum (no weights).
        temporal = 2 * b * t * n * h * (_passes(temporal_trains, True) + 2)
    else:
        # Keys and values for every frame; query, output, feed-forward and attention for the
        # last valid frame only (the one output kept, see temporal.TransformerDelta).
        seqs = b * n
        weights = 2 * seqs * (2 * t * h * h + 2 * h * h + 2 * h * cfg.temporal_mlp_dim)
        attn = 2 * seqs * 2 * t * h
        temporal = weights * _passes(temporal_trains, True) + attn * 3

    # LLM: projections per token, lm_head, and full (unmasked) attention as XLA computes it.
    tokens = batch * seq_len
    per_layer = h * (m.heads + 2 * m.kv_heads) * m.head_dim + m.heads * m.head_dim * h + 3 * h * m.mlp_dim
    weights = 2 * tokens * (m.depth * per_layer + h * m.vocab_size)
    attn = 2 * batch * m.depth * 2 * seq_len * seq_len * m.heads * m.head_dim
    llm_trains = stage == "finetune"
    llm = weights * _passes(llm_trains, True) + attn * 3
    if m.lora is not None:
        dims = {"q": (h, m.heads * m.head_dim), "k": (h, m.kv_heads * m.head_dim),
                "v": (h, m.kv_heads * m.head_dim), "o": (m.heads * m.head_dim, h),
                "gate": (h, m.mlp_dim), "up": (h, m.mlp_dim), "down": (m.mlp_dim, h)}
        adapter = sum(dims[name][0] + dims[name][1] for name in m.lora.targets) * m.lora.rank
        llm += 2 * tokens * m.depth * adapter * 3

    parts = dict(vision=vit, projector=projector, temporal=temporal, llm=llm)
    parts["total"] = sum(parts.values())
    return parts


def forward_flops_per_token(cfg: ValleyConfig, seq_len: int) -> float:
    """Decoder forward FLOPs per generated token at context `seq_len` (for generation speed)."""
    m, h = cfg.llm, cfg.llm.hidden
    per_layer = h * (m.heads + 2 * m.kv_heads) * m.head_dim + m.heads * m.head_dim * h + 3 * h * m.mlp_dim
    return 2 * (m.depth * per_layer + h * m.vocab_size) + 4 * m.depth * seq_len * m.heads * m.head_dim
