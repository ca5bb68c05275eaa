"""LoRA for stage 2: adapters live in the decoder's Dense layers (LlamaConfig.lora); `merge`
folds them into the base kernels, giving a plain model that needs no adapters."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from valley_jax.config import ValleyConfig


def merge(params: dict, cfg: ValleyConfig) -> tuple[dict, ValleyConfig]:
    """params {path: array} of a LoRA model -> (params without adapters, config with lora=None).

    kernel' = kernel + lora_a @ lora_b * alpha / rank, per stacked layer."""
    lora = cfg.llm.lora
    if lora is None:
        raise ValueError("this model has no LoRA adapters to merge")
    out = {p: v for p, v in params.items() if p[-1] not in ("lora_a", "lora_b")}
    for path in params:
        if path[-1] != "lora_a":
            continue
        base = path[:-1]
        a, b = params[path], params[base + ("lora_b",)]
        kernel = params[base + ("kernel",)]
        layers = a.shape[0]
        delta = jnp.einsum("lir,lro->lio", jnp.reshape(a, (layers, -1, lora.rank)).astype(jnp.float32),
                           jnp.reshape(b, (layers, lora.rank, -1)).astype(jnp.float32))
        scale = lora.alpha / lora.rank
        merged = kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)
        out[base + ("kernel",)] = merged.astype(kernel.dtype)
    return out, dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=None))


def adapter_count(params: dict) -> int:
    return int(sum(np.prod(v.shape) for p, v in params.items() if p[-1] in ("lora_a", "lora_b")))
