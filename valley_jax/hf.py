"""The one table between Hugging Face / PyTorch tensor names and valley_jax parameters.

Each `Entry` says where a Hugging Face tensor lives in the Valley state (a path of attribute
names, plus a layer index for stacked layers) and how to turn one into the other. The same table
serves loading (HF -> JAX), exporting (JAX -> HF) and the round trip is exact: every transform is
a transpose / reshape, never arithmetic.

Key layouts covered:
  * transformers' CLIPVisionModel (`vision_model.` prefix optional: transformers 5 drops it),
  * transformers' LlamaForCausalLM (`model.*`, `lm_head.weight`),
  * the authors' ValleyLlamaForCausalLM (`model.vision_tower.vision_model.*`,
    `model.mm_projector.*`, `model.pooling_layer.*`, `model.transformer_delta_encoder.layers.0.*`,
    `model.position_matrix`; dead `model.transforemr_adding_layer.*` and `rotary_emb.inv_freq`
    are ignored).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Optional

import numpy as np

from valley_jax.config import LlamaConfig, ValleyConfig, VisionConfig

Path = tuple  # attribute names from the Valley module root, e.g. ('llm', 'layers', 'q', 'kernel')


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str
    path: Path
    layer: Optional[int]  # index into the stacked 'layers' axis, or None
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


def _linear(in_shape, out_shape):
    """torch Linear weight [out, in] <-> kernel [*in_shape, *out_shape]."""
    def to_jax(w):
        return np.ascontiguousarray(w.T).reshape(tuple(in_shape) + tuple(out_shape))

    def to_hf(k):
        return np.ascontiguousarray(k.reshape(int(np.prod(in_shape)), int(np.prod(out_shape))).T)
    return to_jax, to_hf


def _reshape(jax_shape):
    hf_shape = (int(np.prod(jax_shape)),)
    return (lambda b: b.reshape(jax_shape)), (lambda b: b.reshape(hf_shape))


def _conv():
    """torch Conv2d weight [out, in, kh, kw] <-> HWIO [kh, kw, in, out]."""
    return (lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
            lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1)))


def _norm(hf: str, path: Path, layer=None, bias=True):
    out = [Entry(f"{hf}.weight", path + ("scale",), layer, _same, _same)]
    if bias:
        out.append(Entry(f"{hf}.bias", path + ("bias",), layer, _same, _same))
    return out


def _dense(hf: str, path: Path, in_shape, out_shape, layer=None, bias=True):
    out = [Entry(f"{hf}.weight", path + ("kernel",), layer, *_linear(in_shape, out_shape))]
    if bias:
        out.append(Entry(f"{hf}.bias", path + ("bias",), layer, *_reshape(tuple(out_shape))))
    return out


def clip_entries(cfg: VisionConfig, prefix: str, root: Path = ("vision",)) -> list[Entry]:
    """CLIPVisionModel keys under `prefix` (e.g. 'vision_model.' or '')."""
    d, h = cfg.width, cfg.heads
    hd = d // h
    p = prefix
    out = [
        Entry(f"{p}embeddings.patch_embedding.weight", root + ("patch_embed",), None, *_conv()),
        Entry(f"{p}embeddings.class_embedding", root + ("class_embed",), None, _same, _same),
        Entry(f"{p}embeddings.position_embedding.weight", root + ("pos_embed",), None, _same, _same),
        *_norm(f"{p}pre_layrnorm", root + ("pre_ln",)),
        *_norm(f"{p}post_layernorm", root + ("post_ln",)),
    ]
    lr = root + ("layers",)
    for i in range(cfg.depth):
        q = f"{p}encoder.layers.{i}"
        for name in "qkv":
            out += _dense(f"{q}.self_attn.{name}_proj", lr + (name,), (d,), (h, hd), i)
        out += _dense(f"{q}.self_attn.out_proj", lr + ("o",), (h, hd), (d,), i)
        out += _norm(f"{q}.layer_norm1", lr + ("ln1",), i)
        out += _norm(f"{q}.layer_norm2", lr + ("ln2",), i)
        out += _dense(f"{q}.mlp.fc1", lr + ("fc1",), (d,), (cfg.mlp_dim,), i)
        out += _dense(f"{q}.mlp.fc2", lr + ("fc2",), (cfg.mlp_dim,), (d,), i)
    return out


def llama_entries(cfg: LlamaConfig, prefix: str = "model.", root: Path = ("llm",),
                  lm_head: str = "lm_head.weight") -> list[Entry]:
    e, h, kv, hd, m = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
    out = [
        Entry(f"{prefix}embed_tokens.weight", root + ("embed",), None, _same, _same),
        *_norm(f"{prefix}norm", root + ("norm",), bias=False),
        Entry(lm_head, root + ("lm_head", "kernel"), None, *_linear((e,), (cfg.vocab_size,))),
    ]
    lr = root + ("layers",)
    for i in range(cfg.depth):
        q = f"{prefix}layers.{i}"
        out += _dense(f"{q}.self_attn.q_proj", lr + ("q",), (e,), (h, hd), i, bias=False)
        out += _dense(f"{q}.self_attn.k_proj", lr + ("k",), (e,), (kv, hd), i, bias=False)
        out += _dense(f"{q}.self_attn.v_proj", lr + ("v",), (e,), (kv, hd), i, bias=False)
        out += _dense(f"{q}.self_attn.o_proj", lr + ("o",), (h, hd), (e,), i, bias=False)
        out += _dense(f"{q}.mlp.gate_proj", lr + ("gate",), (e,), (m,), i, bias=False)
        out += _dense(f"{q}.mlp.up_proj", lr + ("up",), (e,), (m,), i, bias=False)
        out += _dense(f"{q}.mlp.down_proj", lr + ("down",), (m,), (e,), i, bias=False)
        out += _norm(f"{q}.input_layernorm", lr + ("attn_norm",), i, bias=False)
        out += _norm(f"{q}.post_attention_layernorm", lr + ("mlp_norm",), i, bias=False)
    return out


def _split_in_proj(index: int, width: int):
    """One third (q, k or v) of torch MultiheadAttention's packed in_proj weight / bias."""
    sl = slice(index * width, (index + 1) * width)
    return sl


def temporal_entries(cfg: ValleyConfig, prefix: str = "model.") -> list[Entry]:
    """The authors' v2 `pooling_layer` or v3 `transformer_delta_encoder` + `position_matrix`.

    v3's packed `in_proj_weight` [3H, H] / `in_proj_bias` [3H] are handled by `PACKED` below.
    """
    h = cfg.llm.hidden
    if cfg.temporal == "mean":
        return []
    if cfg.temporal == "importance":
        n = cfg.vision.num_patches
        return [
            Entry(f"{prefix}pooling_layer.weight", ("temporal", "kernel"), None,
                  lambda w: w.reshape(n, h), lambda k: k.reshape(1, n * h)),
            Entry(f"{prefix}pooling_layer.bias", ("temporal", "bias"), None, _same, _same),
        ]
    heads = cfg.temporal_heads
    hd = h // heads
    q = f"{prefix}transformer_delta_encoder.layers.0"
    root = ("temporal",)
    return [
        Entry(f"{prefix}position_matrix", root + ("position",), None, _same, _same),
        *_dense(f"{q}.self_attn.out_proj", root + ("o",), (heads, hd), (h,)),
        *_dense(f"{q}.linear1", root + ("linear1",), (h,), (cfg.temporal_mlp_dim,)),
        *_dense(f"{q}.linear2", root + ("linear2",), (cfg.temporal_mlp_dim,), (h,)),
        *_norm(f"{q}.norm1", root + ("norm1",)),
        *_norm(f"{q}.norm2", root + ("norm2",)),
    ]


def packed_in_proj(cfg: ValleyConfig, prefix: str = "model.") -> dict[str, list[Entry]]:
    """v3's packed q/k/v projection: one torch tensor -> three Valley parameters."""
    if cfg.temporal != "transformer":
        return {}
    h, heads = cfg.llm.hidden, cfg.temporal_heads
    hd = h // heads
    q = f"{prefix}transformer_delta_encoder.layers.0.self_attn"
    weights, biases = [], []
    for i, name in enumerate("qkv"):
        to_jax, to_hf = _linear((h,), (heads, hd))
        sl = _split_in_proj(i, h)
        weights.append(Entry(q + ".in_proj_weight", ("temporal", name, "kernel"), None,
                             lambda w, sl=sl, f=to_jax: f(w[sl]), to_hf))
        bj, bh = _reshape((heads, hd))
        biases.append(Entry(q + ".in_proj_bias", ("temporal", name, "bias"), None,
                            lambda b, sl=sl, f=bj: f(b[sl]), bh))
    return {q + ".in_proj_weight": weights, q + ".in_proj_bias": biases}


# Keys present in released checkpoints that carry nothing Valley uses.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
IGNORED_PREFIXES = ("model.transforemr_adding_layer.",)


def is_ignored(key: str) -> bool:
    return key.endswith(IGNORED_SUFFIXES) or key.startswith(IGNORED_PREFIXES)


def valley_entries(cfg: ValleyConfig, vision_prefix: str = "model.vision_tower.vision_model."
                   ) -> list[Entry]:
    """Every single-tensor entry of the authors' layout (packed v3 q/k/v: `packed_in_proj`)."""
    return (llama_entries(cfg.llm)
            + clip_entries(cfg.vision, vision_prefix)
            + _dense("model.mm_projector", ("projector", "linear"), (cfg.vision.width,),
                     (cfg.llm.hidden,))
            + temporal_entries(cfg))


def assemble(entries: list[Entry], get: Callable[[str], np.ndarray], shapes: Mapping[Path, tuple],
             packed: Mapping[str, list[Entry]] = None) -> dict[Path, np.ndarray]:
    """Builds the flat Valley state {path: array} from HF tensors fetched one at a time by `get`.

    Stacked parameters are filled layer by layer into one preallocated array, so peak memory is
    the output plus one source tensor. `shapes` gives the expected shape of every path; a source
    tensor of the wrong shape is an error naming it.
    """
    out: dict[Path, np.ndarray] = {}
    groups = [[e] for e in entries] + [list(v) for v in (packed or {}).values()]
    for group in groups:
        src = get(group[0].hf)
        for e in group:
            if e.path not in shapes:
                raise KeyError(f"{e.hf}: no parameter {'.'.join(e.path)} in this model")
            want = shapes[e.path]
            try:
                value = e.to_jax(np.asarray(src))
            except ValueError as err:
                raise ValueError(f"{e.hf}: shape {tuple(src.shape)} does not fit "
                                 f"{'.'.join(e.path)} {want}: {err}") from None
            if e.layer is None:
                if value.shape != tuple(want):
                    raise ValueError(f"{e.hf}: shape {tuple(src.shape)} gives {value.shape}, "
                                     f"expected {tuple(want)} for {'.'.join(e.path)}")
                out[e.path] = value
            else:
                if value.shape != tuple(want[1:]):
                    raise ValueError(f"{e.hf}: shape {tuple(src.shape)} gives {value.shape}, "
                                     f"expected {tuple(want[1:])} for layer {e.layer} of "
                                     f"{'.'.join(e.path)}")
                if e.path not in out:
                    out[e.path] = np.empty(want, value.dtype)
                out[e.path][e.layer] = value
    return out


def export(entries: list[Entry], flat: Mapping[Path, np.ndarray],
           packed: Mapping[str, list[Entry]] = None) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of `assemble`: yields (hf_name, tensor) one at a time."""
    for e in entries:
        value = np.asarray(flat[e.path] if e.layer is None else flat[e.path][e.layer])
        yield e.hf, e.to_hf(value)
    for name, group in (packed or {}).items():
        parts = [e.to_hf(np.asarray(flat[e.path])) for e in group]
        yield name, np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------------
# Configs


def vision_config_from_hf(d: Mapping, select_layer: int = -2) -> VisionConfig:
    """A CLIPVisionConfig dict, or a CLIPConfig dict holding one under `vision_config`."""
    d = d.get("vision_config", d)
    act = d.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"CLIP hidden_act {act!r} is not supported (Valley's ViT uses quick_gelu)")
    return VisionConfig(image_size=d["image_size"], patch_size=d["patch_size"],
                        width=d["hidden_size"], depth=d["num_hidden_layers"],
                        heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
                        layer_norm_eps=d.get("layer_norm_eps", 1e-5), select_layer=select_layer)


def vision_config_to_hf(cfg: VisionConfig) -> dict:
    return dict(model_type="clip_vision_model", image_size=cfg.image_size,
                patch_size=cfg.patch_size, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
                layer_norm_eps=cfg.layer_norm_eps, hidden_act="quick_gelu", num_channels=3)


def llama_config_from_hf(d: Mapping) -> LlamaConfig:
    """A LlamaConfig dict (transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters`)."""
    from valley_jax.config import RopeScaling
    rope = dict(d.get("rope_parameters") or {})
    if d.get("rope_scaling"):
        rope.update(d["rope_scaling"])
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        scaling = None
    elif kind == "linear":
        scaling = RopeScaling("linear", float(rope["factor"]))
    elif kind == "llama3":
        scaling = RopeScaling("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                              float(rope["high_freq_factor"]),
                              int(rope["original_max_position_embeddings"]))
    else:
        raise ValueError(f"rope type {kind!r} is not supported (default, linear, llama3)")
    heads = d["num_attention_heads"]
    return LlamaConfig(vocab_size=d["vocab_size"], hidden=d["hidden_size"],
                       depth=d["num_hidden_layers"], heads=heads,
                       kv_heads=d.get("num_key_value_heads") or heads,
                       head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                       mlp_dim=d["intermediate_size"], rms_eps=d.get("rms_norm_eps", 1e-6),
                       rope_theta=float(theta), rope_scaling=scaling,
                       max_position=d.get("max_position_embeddings", 2048))


def llama_config_to_hf(cfg: LlamaConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s is not None:
        rope.update(rope_type=s.rope_type, factor=s.factor)
        if s.rope_type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position)
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.head_dim, intermediate_size=cfg.mlp_dim, rms_norm_eps=cfg.rms_eps,
                rope_theta=cfg.rope_theta, rope_parameters=rope,
                max_position_embeddings=cfg.max_position, hidden_act="silu",
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False)


# ---------------------------------------------------------------------------------------------
# Reading tensors and moving them in and out of a model


class TensorReader:
    """Reads tensors one at a time from a Hugging Face folder: `model.safetensors`, a sharded
    `*.safetensors.index.json`, or `pytorch_model*.bin` (loaded with weights_only=True, so a
    pickle that would run code is refused)."""

    def __init__(self, folder):
        import json
        import os
        self.folder = os.fspath(folder)
        self._open_name, self._open_handle = None, None
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"{self.folder}: not a folder")
        names = sorted(os.listdir(self.folder))
        index = [n for n in names if n.endswith(".index.json")]
        if index:
            with open(os.path.join(self.folder, index[0])) as f:
                weight_map = json.load(f)["weight_map"]
            missing = sorted({f for f in weight_map.values()
                              if not os.path.exists(os.path.join(self.folder, f))})
            if missing:
                raise FileNotFoundError(f"{self.folder}: shards listed in {index[0]} are missing: "
                                        f"{', '.join(missing)}")
        else:
            files = ([n for n in names if n.endswith(".safetensors")]
                     or [n for n in names if n.endswith(".bin") and n.startswith("pytorch_model")])
            if not files:
                raise FileNotFoundError(f"{self.folder}: no *.safetensors or pytorch_model*.bin")
            weight_map = {key: name for name in files for key in self._open(name).keys()}
        self.weight_map = weight_map

    def _open(self, name):
        """Opens one shard, closing the previous one: host memory stays bounded by one shard."""
        import os
        if name == self._open_name:
            return self._open_handle
        path = os.path.join(self.folder, name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open
            handle = safe_open(path, framework="numpy")
        else:
            import torch
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # UnpicklingError for code-running pickles, and friends
                raise ValueError(f"{path}: refused to load with weights_only=True: {err}") from None
            handle = _TorchStateDict(sd)
        self._open_name, self._open_handle = name, handle
        return handle

    def keys(self):
        return list(self.weight_map)

    def __contains__(self, key):
        return key in self.weight_map

    def get(self, key: str) -> np.ndarray:
        if key not in self.weight_map:
            raise KeyError(f"{self.folder}: tensor {key!r} not found")
        return self._open(self.weight_map[key]).get_tensor(key)


class _TorchStateDict:
    def __init__(self, sd):
        self.sd = sd

    def keys(self):
        return self.sd.keys()

    def get_tensor(self, key):
        t = self.sd[key]
        import torch
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: go through ml_dtypes bit-exactly
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def flat_shapes(model) -> dict[Path, tuple]:
    """{path: shape} of every variable of an nnx module (concrete or abstract)."""
    from flax import nnx
    return {tuple(p): tuple(v.shape) for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable)}


def get_flat(model) -> dict[Path, np.ndarray]:
    from flax import nnx
    return {tuple(p): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable)}


def set_flat(model, flat: Mapping[Path, np.ndarray], strict: bool = True) -> None:
    """Writes arrays into the model's variables in place (cast to each variable's dtype)."""
    import jax.numpy as jnp
    from flax import nnx
    seen = set()
    for p, v in nnx.iter_graph(model):
        if not isinstance(v, nnx.Variable):
            continue
        p = tuple(p)
        if p in flat:
            v.set_value(jnp.asarray(flat[p], dtype=v.get_value().dtype))
            seen.add(p)
        elif strict:
            raise KeyError(f"no value for parameter {'.'.join(map(str, p))}")
    unused = set(flat) - seen
    if unused:
        raise KeyError(f"values for unknown parameters: {sorted(unused)[:5]}")


def clip_prefix(keys, root: str = "") -> str:
    """The key prefix of a CLIP vision tower under `root`: with or without `vision_model.`."""
    keys = list(keys)
    if any(k.startswith(root + "vision_model.") for k in keys):
        return root + "vision_model."
    if any(k.startswith(root + "embeddings.") for k in keys):
        return root
    raise KeyError(f"no CLIP vision tower keys under {root!r} (looked for 'vision_model.' and "
                   "'embeddings.')")


def _read_config(folder) -> dict:
    import json
    import os
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing")
    with open(path) as f:
        return json.load(f)


def load_clip(folder, policy=None, select_layer: int = -2):
    """A CLIPVision module from a transformers CLIPVisionModel / CLIPModel folder."""
    from flax import nnx
    from valley_jax.clip import CLIPVision
    from valley_jax.layers import Policy
    cfg = vision_config_from_hf(_read_config(folder), select_layer)
    reader = TensorReader(folder)
    model = nnx.eval_shape(lambda: CLIPVision(cfg, policy or Policy(), rngs=nnx.Rngs(0)))
    entries = clip_entries(cfg, clip_prefix(reader.keys()), root=())
    set_flat(model, assemble(entries, reader.get, flat_shapes(model)))
    return model


def load_llama(folder, policy=None):
    """A Llama module from a transformers LlamaForCausalLM folder."""
    from flax import nnx
    from valley_jax.layers import Policy
    from valley_jax.llama import Llama
    cfg = llama_config_from_hf(_read_config(folder))
    reader = TensorReader(folder)
    model = nnx.eval_shape(lambda: Llama(cfg, policy or Policy(), rngs=nnx.Rngs(0)))
    set_flat(model, assemble(llama_entries(cfg, root=()), reader.get, flat_shapes(model)))
    return model


def valley_from_tensors(cfg: ValleyConfig, keys, get: Callable[[str], np.ndarray], policy=None):
    """A Valley model from tensors named as in the authors' checkpoints (`get(name)` fetches
    one). Unknown keys are an error; the dead duplicate layer and rotary buffers are skipped."""
    from flax import nnx
    from valley_jax.layers import Policy
    from valley_jax.valley import Valley
    keys = list(keys)
    entries = valley_entries(cfg, clip_prefix(keys, "model.vision_tower."))
    packed = packed_in_proj(cfg)
    known = {e.hf for e in entries} | set(packed)
    unknown = sorted(k for k in keys if k not in known and not is_ignored(k))
    if unknown:
        raise KeyError(f"tensors this {cfg.temporal!r} Valley has no place for: "
                       f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    missing = sorted(known - set(keys))
    if missing:
        raise KeyError(f"tensors missing from the checkpoint: {', '.join(missing[:8])}"
                       f"{' ...' if len(missing) > 8 else ''}")
    model = nnx.eval_shape(lambda: Valley(cfg, policy or Policy(), rngs=nnx.Rngs(0)))
    set_flat(model, assemble(entries, get, flat_shapes(model), packed))
    return model
