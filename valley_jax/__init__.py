"""Valley (Luo et al., 2023) in JAX/Flax NNX: frozen CLIP ViT -> projector -> temporal module -> LLaMA."""

from valley_jax import malloc as _malloc

__version__ = "0.1.0"

# `python -m valley_jax.train` (or .chat, .evaluate) imports this package first: switch to a
# faster allocator now, before the program's own imports (jax and the rest) would load twice.
if _malloc.program() in _malloc.PROGRAMS:
    _malloc.maybe_reexec()
