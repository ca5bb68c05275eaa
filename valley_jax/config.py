"""Model configurations: the vision tower, the decoder and Valley itself, with named presets.

The presets are the real sizes Valley was released at (CLIP ViT-L/14 with Vicuna / Llama-2 7B
and 13B) and a tiny `demo` that trains on a CPU. Run configs (configs/*.py) pick a preset by name
and may override single fields.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from valley_jax import tokens


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision transformer (pre-LN, quick-GELU)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-5
    # Which hidden state feeds Valley: index into the (depth + 1) hidden states, -2 = the input
    # of the last layer. The post layer norm is never applied to it.
    select_layer: int = -2
    # Standard deviation of freshly initialised weights (Hugging Face's initializer_range);
    # loaded checkpoints replace them.
    init_std: float = 0.02

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_to_run(self) -> int:
        """Layers that produce the selected hidden state (the rest need no compute)."""
        n = self.depth + 1
        if not -n <= self.select_layer < n:
            raise ValueError(f"select_layer {self.select_layer} out of range for depth {self.depth}")
        return self.select_layer % n


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Hugging Face `rope_parameters` other than the default: 'linear' or 'llama3'."""

    rope_type: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the decoder's projections (Valley's stage-2 LoRA variant)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied lm_head)."""

    vocab_size: int = 32000
    hidden: int = 4096
    depth: int = 32
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    mlp_dim: int = 11008
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position: int = 4096
    lora: Optional[LoraConfig] = None
    init_std: float = 0.02  # fresh weights (initializer_range); loaded checkpoints replace them


@dataclasses.dataclass(frozen=True)
class ValleyConfig:
    vision: VisionConfig = VisionConfig()
    llm: LlamaConfig = LlamaConfig()
    # Temporal module: 'mean' (v1), 'importance' (v2) or 'transformer' (v3).
    temporal: str = "mean"
    temporal_heads: int = 8
    temporal_mlp_dim: int = 2048
    temporal_dropout: float = 0.1
    temporal_max_frames: int = 2048  # rows of the v3 position table
    num_frames: int = 8
    # Token ids of the media placeholders; they depend on the tokenizer (set by the data side).
    im_patch_id: int = 32004
    vi_frame_id: int = 32001
    pixel_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    pixel_std: tuple = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        if self.temporal not in ("mean", "importance", "transformer"):
            raise ValueError(f"unknown temporal module {self.temporal!r}")


def _llama_ids(base_vocab: int) -> dict:
    """Token ids when Valley's tokens are added to a LLaMA tokenizer without a pad token."""
    added = (tokens.PAD,) + tokens.ADDED_TOKENS
    ids = {tok: base_vocab + i for i, tok in enumerate(added)}
    return dict(im_patch_id=ids[tokens.IM_PATCH], vi_frame_id=ids[tokens.VI_FRAME],
                vocab_size=base_vocab + len(added))


def preset(name: str) -> ValleyConfig:
    """A named model configuration: 'demo', '7b' (Llama-2 / Vicuna 7B) or '13b'."""
    clip_l14 = VisionConfig()
    if name == "demo":
        # Trained from scratch on CPU: fresh weights at width ** -0.5, not CLIP's and LLaMA's 0.02
        # (made for widths of 1024-5120), which would leave these narrow towers nearly linear.
        vision = VisionConfig(image_size=224, patch_size=14, width=64, depth=3, heads=4, mlp_dim=128,
                              init_std=64 ** -0.5)
        # 8 heads of 16 dims, each with its own keys and values (4 of 32 sharing 2 key-value
        # heads until session 23: the same width, 9-11 % more stage-2 time). The demo answers a
        # colour question through a head that finds its shape word, a shape question through one
        # that finds its colour word; with 2 key-value heads a layer, some draws never grew one
        # (shape 0.58 at seed 0, colour 0.72 at seed 1). With 8, seeds 0-4 answered colour 1.00
        # and shape 0.92-1.00 (BENCHMARKS.md, "CPU demo", session 24).
        llm = LlamaConfig(vocab_size=1024, hidden=128, depth=2, heads=8, kv_heads=8, head_dim=16,
                          mlp_dim=256, max_position=2048, init_std=128 ** -0.5)
        return ValleyConfig(vision=vision, llm=llm, temporal_mlp_dim=256, im_patch_id=1000,
                            vi_frame_id=1001)
    if name in ("7b", "13b"):
        ids = _llama_ids(32000)
        hidden, depth, heads, mlp = (4096, 32, 32, 11008) if name == "7b" else (5120, 40, 40, 13824)
        llm = LlamaConfig(vocab_size=ids["vocab_size"], hidden=hidden, depth=depth, heads=heads,
                          kv_heads=heads, head_dim=128, mlp_dim=mlp)
        return ValleyConfig(vision=clip_l14, llm=llm, im_patch_id=ids["im_patch_id"],
                            vi_frame_id=ids["vi_frame_id"])
    raise ValueError(f"unknown model preset {name!r}; choose demo, 7b or 13b")


def to_dict(cfg: ValleyConfig) -> dict:
    """A JSON-ready dict of a ValleyConfig (stored with every checkpoint)."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> ValleyConfig:
    """The inverse of `to_dict`; unknown fields are an error naming them."""
    d = dict(d)
    llm = dict(d.pop("llm", {}))
    scaling = llm.pop("rope_scaling", None)
    lora = llm.pop("lora", None)
    try:
        vision = VisionConfig(**d.pop("vision", {}))
        if lora:
            lora["targets"] = tuple(lora.get("targets", LoraConfig.targets))
        llm = LlamaConfig(rope_scaling=RopeScaling(**scaling) if scaling else None,
                          lora=LoraConfig(**lora) if lora else None, **llm)
        if "pixel_mean" in d:
            d["pixel_mean"], d["pixel_std"] = tuple(d["pixel_mean"]), tuple(d["pixel_std"])
        return ValleyConfig(vision=vision, llm=llm, **d)
    except TypeError as err:
        raise ValueError(f"invalid Valley model config: {err}") from None
