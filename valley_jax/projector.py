"""The projector: one Linear(vision width -> LLM width), applied to every token of every frame."""

from __future__ import annotations

from flax import nnx

from valley_jax.layers import Dense, Policy


class Projector(nnx.Module):
    def __init__(self, vision_width: int, llm_width: int, policy: Policy, *, rngs: nnx.Rngs):
        self.linear = Dense((vision_width,), (llm_width,), (None,), ("embed",), use_bias=True,
                            policy=policy, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)
