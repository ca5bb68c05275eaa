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
             packed: Mapping[str, list[Entry]] = None,
             where: Optional[Callable[[str], str]] = None) -> dict[Path, np.ndarray]:
    """Builds the flat Valley state {path: array} from HF tensors fetched one at a time by `get`.

    Stacked parameters are filled layer by layer into one preallocated array, so peak memory is
    the output plus one source tensor. `shapes` gives the expected shape of every path; a source
    tensor of the wrong shape is an error naming it (and, with `where(name)`, e.g.
    `TensorReader.file_of`, the file it came from).
    """
    out: dict[Path, np.ndarray] = {}
    groups = [[e] for e in entries] + [list(v) for v in (packed or {}).values()]
    for group in groups:
        src = get(group[0].hf)
        for e in group:
            name = f"{where(e.hf)}: {e.hf}" if where else e.hf
            if e.path not in shapes:
                raise KeyError(f"{name}: no parameter {'.'.join(e.path)} in this model")
            want = shapes[e.path]
            try:
                value = e.to_jax(np.asarray(src))
            except ValueError as err:
                raise ValueError(f"{name}: shape {tuple(src.shape)} does not fit "
                                 f"{'.'.join(e.path)} {want}: {err}") from None
            if e.layer is None:
                if value.shape != tuple(want):
                    raise ValueError(f"{name}: shape {tuple(src.shape)} gives {value.shape}, "
                                     f"expected {tuple(want)} for {'.'.join(e.path)}")
                out[e.path] = value
            else:
                if value.shape != tuple(want[1:]):
                    raise ValueError(f"{name}: shape {tuple(src.shape)} gives {value.shape}, "
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
    pickle that would run code is refused).

    Errors name the file and the tensor. Only one shard is open at a time, so host memory holds
    at most one shard's mapped pages besides the tensors the caller keeps.
    """

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
            path = os.path.join(self.folder, index[0])
            try:
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as err:
                raise ValueError(f"{path}: not a shard index (no 'weight_map'): {err}") from None
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
        self.close()
        path = os.path.join(self.folder, name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as err:  # SafetensorError: truncated or not a safetensors file
                raise ValueError(f"{path}: not a readable safetensors file: {err}") from None
        else:
            import torch
            try:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    # Pre-zip (legacy) torch.save files cannot be mapped: read them whole.
                    sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # UnpicklingError for code-running pickles, and friends
                raise ValueError(f"{path}: refused to load with weights_only=True: {err}") from None
            if not isinstance(sd, dict):
                raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict")
            handle = _TorchStateDict(sd)
        self._open_name, self._open_handle = name, handle
        return handle

    def close(self) -> None:
        """Releases the open shard (its mapping goes with the last reference to the handle)."""
        self._open_name, self._open_handle = None, None

    def keys(self):
        return list(self.weight_map)

    def __contains__(self, key):
        return key in self.weight_map

    def file_of(self, key: str) -> str:
        """The path of the file that holds `key` (for error messages)."""
        import os
        if key not in self.weight_map:
            return self.folder
        return os.path.join(self.folder, self.weight_map[key])

    def _checked(self, key: str):
        if key not in self.weight_map:
            raise KeyError(f"{self.folder}: tensor {key!r} not found")
        handle = self._open(self.weight_map[key])
        if key not in handle.keys():  # an index that lists a tensor its shard lacks
            raise KeyError(f"{self.file_of(key)}: tensor {key!r} not found in this shard")
        return handle

    def get(self, key: str) -> np.ndarray:
        handle = self._checked(key)
        try:
            return handle.get_tensor(key)
        except Exception as err:  # a truncated shard, an unsupported dtype
            raise ValueError(f"{self.file_of(key)}: cannot read tensor {key!r}: {err}") from None

    def shape(self, key: str) -> tuple:
        """The shape of a tensor, without reading its data."""
        handle = self._checked(key)
        if isinstance(handle, _TorchStateDict):
            return handle.get_shape(key)
        return tuple(handle.get_slice(key).get_shape())


class _TorchStateDict:
    def __init__(self, sd):
        self.sd = sd

    def keys(self):
        return self.sd.keys()

    def get_shape(self, key):
        return tuple(self.sd[key].shape)

    def get_tensor(self, key):
        t = self.sd[key]
        import torch
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{key!r} is a {type(t).__name__}, not a tensor")
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: go through ml_dtypes bit-exactly
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class ShardedWriter:
    """Writes tensors, one at a time, as safetensors shards of at most `max_shard_bytes` each
    (a larger tensor gets a shard of its own) and, for more than one shard, the
    `{prefix}.safetensors.index.json` that transformers reads.

    Only the tensors of the shard being filled are held in memory. Shards are written under
    temporary names and renamed when the total count is known (`model-00001-of-00003...`).
    """

    def __init__(self, folder, prefix: str = "model", max_shard_bytes: int = 2 * 1024 ** 3,
                 dtype=None):
        import os
        self.folder, self.prefix, self.max_shard_bytes = os.fspath(folder), prefix, max_shard_bytes
        self.dtype = dtype  # cast every tensor to this dtype (None: keep each tensor's own)
        os.makedirs(self.folder, exist_ok=True)
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file, its tensor names)
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, value: np.ndarray) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        value = np.ascontiguousarray(value if self.dtype is None else value.astype(self.dtype))
        if self._pending and self._pending_bytes + value.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = value
        self._pending_bytes += value.nbytes
        self.total_bytes += value.nbytes

    def _flush(self) -> None:
        import os
        from safetensors.numpy import save_file
        tmp = os.path.join(self.folder, f".{self.prefix}-part{len(self._written):05d}.tmp")
        save_file(self._pending, tmp, metadata={"format": "pt"})
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Writes what is pending, names the shards, writes the index; returns the file names."""
        import json
        import os
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        names = ([f"{self.prefix}.safetensors"] if n == 1 else
                 [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map = {}
        umask = os.umask(0)
        os.umask(umask)
        for (tmp, keys), name in zip(self._written, names):
            os.replace(tmp, os.path.join(self.folder, name))
            # safetensors creates files private (0600); published weights are for reading.
            os.chmod(os.path.join(self.folder, name), 0o666 & ~umask)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(os.path.join(self.folder, f"{self.prefix}.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return names


def variables(model) -> dict[Path, object]:
    """{path: nnx.Variable} of every variable of an nnx module (concrete or abstract)."""
    from flax import nnx
    return {tuple(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def flat_shapes(model) -> dict[Path, tuple]:
    """{path: shape} of every variable of an nnx module (concrete or abstract)."""
    return {p: tuple(v.shape) for p, v in variables(model).items()}


def get_flat(model) -> dict[Path, np.ndarray]:
    return {p: np.asarray(v[...]) for p, v in variables(model).items()}


def set_flat(model, flat: Mapping[Path, np.ndarray], strict: bool = True) -> None:
    """Writes arrays into the model's variables in place (cast to each variable's dtype).
    Every array must have its variable's shape: a checkpoint of another architecture (e.g. one
    layer more) is refused, not written in."""
    import jax.numpy as jnp
    model_vars = variables(model)
    if strict and (missing := sorted(p for p in model_vars if p not in flat)):
        raise KeyError(f"no value for parameter {'.'.join(map(str, missing[0]))}")
    if unused := set(flat) - set(model_vars):
        raise KeyError(f"values for unknown parameters: {sorted(unused)[:5]}")
    if wrong := [f"{'.'.join(map(str, p))} {tuple(np.shape(flat[p]))} (the model's: {v.shape})"
                 for p, v in model_vars.items() if p in flat and tuple(np.shape(flat[p])) != v.shape]:
        raise ValueError(f"{len(wrong)} parameters have the wrong shape: {'; '.join(wrong[:5])}")
    for p, v in model_vars.items():
        if p in flat:
            v.set_value(jnp.asarray(flat[p], dtype=v.get_value().dtype))


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


def valley_key_plan(cfg: ValleyConfig, keys) -> tuple[list[Entry], dict[str, list[Entry]]]:
    """The entries (and packed v3 q/k/v) that read an authors'-layout checkpoint holding `keys`.
    Unknown keys are an error; the dead duplicate layer and rotary buffers are skipped."""
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
    return entries, packed


def valley_from_tensors(cfg: ValleyConfig, keys, get: Callable[[str], np.ndarray], policy=None):
    """A Valley model from tensors named as in the authors' checkpoints (`get(name)` fetches
    one). Unknown keys are an error; the dead duplicate layer and rotary buffers are skipped."""
    from flax import nnx
    from valley_jax.layers import Policy
    from valley_jax.valley import Valley
    entries, packed = valley_key_plan(cfg, keys)
    model = nnx.eval_shape(lambda: Valley(cfg, policy or Policy(), rngs=nnx.Rngs(0)))
    set_flat(model, assemble(entries, get, flat_shapes(model), packed))
    return model


# ---------------------------------------------------------------------------------------------
# The authors' config.json (ValleyLlamaForCausalLM) <-> ValleyConfig

VALLEY_ARCHITECTURE = "ValleyLlamaForCausalLM"
DELTA_ENCODER_PREFIX = "model.transformer_delta_encoder.layers.0."
DEAD_DUPLICATE_PREFIX = IGNORED_PREFIXES[0]  # 'model.transforemr_adding_layer.' (sic)
CLIP_HEAD_DIM = 64  # every released CLIP ViT (B/16, L/14, L/14-336) has 64-wide heads


def temporal_from_keys(keys) -> str:
    """The temporal variant an authors'-layout checkpoint holds: v2 'importance' has
    `pooling_layer`, v3 'transformer' has `transformer_delta_encoder`, v1 'mean' neither."""
    keys = list(keys)
    if any(k.startswith("model.pooling_layer.") for k in keys):
        return "importance"
    if any(k.startswith(DELTA_ENCODER_PREFIX) for k in keys):
        return "transformer"
    return "mean"


def vision_config_from_shapes(keys, shape: Callable[[str], tuple], prefix: str,
                              select_layer: int) -> VisionConfig:
    """A CLIP ViT's config read off its tensors (released Valley checkpoints name the tower by
    a hub id only): width and patch size from the patch embedding, depth from the layer count,
    image size from the position table, MLP width from fc1, heads = width / 64."""
    import re
    patch = shape(f"{prefix}embeddings.patch_embedding.weight")  # [width, 3, p, p]
    positions = shape(f"{prefix}embeddings.position_embedding.weight")[0]  # patches + 1
    width, p = patch[0], patch[-1]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ValueError(f"{prefix}embeddings.position_embedding.weight: {positions} rows is not "
                         "a square grid of patches plus the class token")
    layer_re = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    depth = len({m.group(1) for m in map(layer_re.match, keys) if m})
    if width % CLIP_HEAD_DIM:
        raise ValueError(f"{prefix}embeddings.patch_embedding.weight: width {width} is not a "
                         f"multiple of {CLIP_HEAD_DIM}, so the number of heads cannot be inferred")
    mlp = shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0]
    return VisionConfig(image_size=grid * p, patch_size=p, width=width, depth=depth,
                        heads=width // CLIP_HEAD_DIM, mlp_dim=mlp, select_layer=select_layer)


def valley_config_from_hf(d: Mapping, keys, shape: Callable[[str], tuple], *, im_patch_id: int,
                          vi_frame_id: int, num_frames: int = 8) -> ValleyConfig:
    """The ValleyConfig of an authors'-layout checkpoint: its config.json `d` (LlamaConfig fields
    plus mm_*), its tensor names `keys` and `shape(name)`. The vocabulary size comes from the
    embedding tensor and the temporal variant from the keys, not from the config."""
    keys = list(keys)
    # The reference reads `getattr(config, "mm_vision_select_layer", -1)`.
    select = d.get("mm_vision_select_layer", -1)
    if d.get("mm_vision_config"):  # written by our own export: exact, for any CLIP
        vision = vision_config_from_hf(d["mm_vision_config"], select)
    else:
        vision = vision_config_from_shapes(keys, shape, clip_prefix(keys, "model.vision_tower."),
                                           select)
    if d.get("mm_hidden_size") not in (None, vision.width):
        raise ValueError(f"mm_hidden_size {d['mm_hidden_size']} does not match the vision tower's "
                         f"width {vision.width}")
    vocab = shape("model.embed_tokens.weight")[0]
    if "lm_head.weight" in keys and shape("lm_head.weight")[0] != vocab:
        raise ValueError(f"lm_head.weight has {shape('lm_head.weight')[0]} rows but "
                         f"model.embed_tokens.weight has {vocab}")
    llm = llama_config_from_hf({**d, "vocab_size": vocab})
    temporal = temporal_from_keys(keys)
    for flag, kind in (("use_patch_importance_pooling", "importance"),
                       ("use_delta_transformer", "transformer")):
        if d.get(flag) and temporal != kind:
            raise ValueError(f"config.json sets {flag} but the checkpoint has no {kind!r} "
                             f"temporal tensors (found a {temporal!r} Valley)")
    extra = {}
    if temporal == "transformer":
        extra = dict(temporal_mlp_dim=shape(DELTA_ENCODER_PREFIX + "linear1.weight")[0],
                     temporal_max_frames=shape("model.position_matrix")[0])
    return ValleyConfig(vision=vision, llm=llm, temporal=temporal, num_frames=num_frames,
                        im_patch_id=im_patch_id, vi_frame_id=vi_frame_id, **extra)


def valley_config_to_hf(cfg: ValleyConfig, vision_tower: str) -> dict:
    """config.json of the authors' ValleyLlamaForCausalLM. `vision_tower` is what their code
    passes to CLIPVisionModel.from_pretrained (a hub id or folder); the tower's weights come from
    the checkpoint. `mm_vision_config`, `im_patch_token` and `vi_frame_token` are ours: their code
    ignores them, ours reads them back exactly."""
    d = llama_config_to_hf(cfg.llm)
    d.update(architectures=[VALLEY_ARCHITECTURE], model_type="valley",
             mm_vision_tower=vision_tower, mm_hidden_size=cfg.vision.width,
             mm_vision_select_layer=cfg.vision.select_layer, mm_use_im_start_end=True,
             use_mm_proj=True, use_patch_importance_pooling=cfg.temporal == "importance",
             use_delta_transformer=cfg.temporal == "transformer",
             mm_vision_config=vision_config_to_hf(cfg.vision),
             im_patch_token=cfg.im_patch_id, vi_frame_token=cfg.vi_frame_id)
    return d
