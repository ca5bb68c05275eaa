"""PyTorch reference for Valley, written from ../shared/VALLEY_SPEC.md (test code only).

The tiny Hugging Face models built here are saved with `save_pretrained` and loaded by
valley_jax, so the tests compare two independent implementations on the same weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

VISION_KW = dict(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=3,
                 num_attention_heads=4, intermediate_size=64, hidden_act="quick_gelu")
LLAMA_KW = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
IM_PATCH_ID, VI_FRAME_ID = 110, 111  # ids inside the tiny vocabulary
IM_START_ID, IM_END_ID, VI_START_ID, VI_END_ID = 112, 113, 114, 115


def tiny_clip(seed=0, **kw) -> CLIPVisionModel:
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**{**VISION_KW, **kw})).eval()
    _jitter_norms(model)
    return model


def tiny_llama(seed=0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_KW, **kw})).eval()
    _jitter_norms(model)
    return model


def _jitter_norms(model):
    """Fresh norms are all ones / zeros, which would hide a swapped scale or bias."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))


def sinusoid(length, d, n=10000.0):
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    i = torch.arange(d // 2, dtype=torch.float64)[None, :]
    angle = pos / n ** (2 * i / d)
    table = torch.zeros(length, d, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return table.float()


class TemporalReference(nn.Module):
    """The three temporal modules of the spec, on one sample: patches [T, N, H] -> [N, H]."""

    def __init__(self, kind: str, num_patches: int, hidden: int, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        if kind == "importance":
            self.pooling_layer = nn.Linear(num_patches * hidden, 1)
        if kind == "transformer":
            self.layer = nn.TransformerEncoderLayer(d_model=hidden, nhead=8, dim_feedforward=2048,
                                                    dropout=0.1, activation="relu",
                                                    layer_norm_eps=1e-5, batch_first=True,
                                                    norm_first=False)
            self.position_matrix = nn.Parameter(sinusoid(2048, hidden) + 0.01 * torch.randn(2048, hidden))
        self.eval()

    def forward(self, p):
        if self.kind == "mean":
            return p.mean(0)
        if self.kind == "importance":
            score = torch.softmax(self.pooling_layer(p.flatten(1)), dim=0)  # [T, 1]
            return (score[:, :, None] * p).sum(0)
        seq = p.permute(1, 0, 2)  # [N, T, H]
        out = self.layer(seq + self.position_matrix[: seq.shape[1]][None])
        return out[:, -1] + seq.mean(1)

    def valley_state_dict(self) -> dict:
        """The tensors under the names of the authors' checkpoints."""
        if self.kind == "importance":
            return {f"model.pooling_layer.{k}": v for k, v in self.pooling_layer.state_dict().items()}
        if self.kind == "transformer":
            sd = {f"model.transformer_delta_encoder.layers.0.{k}": v
                  for k, v in self.layer.state_dict().items()}
            sd["model.position_matrix"] = self.position_matrix.detach()
            return sd
        return {}


def media_ids(num_patches, num_frames):
    return ([IM_START_ID] + [IM_PATCH_ID] * num_patches + [IM_END_ID, VI_START_ID]
            + [VI_FRAME_ID] * num_frames + [VI_END_ID])


class ValleyReference(nn.Module):
    """Hugging Face CLIP + projector + temporal module + Hugging Face LLaMA, per the spec."""

    def __init__(self, clip, llama, temporal: TemporalReference, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.clip, self.llama, self.temporal = clip, llama, temporal
        self.mm_projector = nn.Linear(clip.config.hidden_size, llama.config.hidden_size)
        self.eval()

    def logits(self, input_ids, pixels, attention_mask):
        """input_ids [B, S] (right padded); pixels: per sample a normalised [T, 3, H, W] tensor or
        None (text only). The ViT is frozen (no gradient); everything after it is differentiable."""
        embeds = self.llama.model.embed_tokens(input_ids)
        rows = []
        for b, px in enumerate(pixels):
            row = embeds[b]
            if px is not None:
                with torch.no_grad():
                    hidden = self.clip(pixel_values=px, output_hidden_states=True).hidden_states[-2]
                feats = self.mm_projector(hidden)  # all tokens of every frame, before merging
                merged = self.temporal(feats[:, 1:])
                patch_pos = (input_ids[b] == IM_PATCH_ID).nonzero()[:, 0]
                frame_pos = (input_ids[b] == VI_FRAME_ID).nonzero()[:, 0]
                assert len(patch_pos) == merged.shape[0] and len(frame_pos) == feats.shape[0]
                row = row.index_put((patch_pos,), merged).index_put((frame_pos,), feats[:, 0])
            rows.append(row)
        return self.llama(inputs_embeds=torch.stack(rows), attention_mask=attention_mask).logits

    @torch.no_grad()
    def forward(self, input_ids, pixels, attention_mask):
        return self.logits(input_ids, pixels, attention_mask)

    def valley_state_dict(self) -> dict:
        """The whole model under the authors' key names (ValleyLlamaForCausalLM)."""
        sd = {}
        for k, v in self.llama.state_dict().items():
            sd[k] = v
        for k, v in self.clip.state_dict().items():
            k = k if k.startswith("vision_model.") else "vision_model." + k
            sd["model.vision_tower." + k] = v
        for k, v in self.mm_projector.state_dict().items():
            sd["model.mm_projector." + k] = v
        sd.update(self.temporal.valley_state_dict())
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def normalise(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> CLIP-normalised float [T, 3, H, W]."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    x = torch.from_numpy(frames_uint8).float() / 255.0
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()

