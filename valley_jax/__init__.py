"""Valley (Luo et al., 2023) in JAX/Flax NNX: frozen CLIP ViT -> projector -> temporal module -> LLaMA."""

__version__ = "0.1.0"
