"""Weight conversion between Hugging Face folders and valley_jax model checkpoints.

    python -m valley_jax.convert from-hf --vision CLIP_DIR --llm LLAMA_DIR --out CKPT
    python -m valley_jax.convert from-valley --model VALLEY_DIR [--base LLAMA_DIR] --out CKPT
    python -m valley_jax.convert to-hf --checkpoint CKPT --out DIR --format valley|llama

`from-hf` starts a Valley from pretrained CLIP and LLaMA/Vicuna weights (fresh projector and
temporal module, Valley's tokens added to the tokenizer and embeddings), `from-valley` reads the
authors' released checkpoints (applying a delta release to its base when given `--base`), and
`to-hf` publishes a checkpoint in the authors' layout or as plain transformers models.

Conversions stream: tensors are read, transformed and written one at a time (hf.assemble /
hf.export, one shard open at a time, safetensors shards of bounded size), so host memory is about
the converted state plus one shard. Output goes to `OUT.partial` and is renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys

import ml_dtypes
import numpy as np

from valley_jax import checkpoint, hf, tokens
from valley_jax.config import ValleyConfig, to_dict

DTYPES = {"auto": None, "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
# What the authors' code passes to CLIPVisionModel.from_pretrained when nothing better is known
# (the checkpoint's own tower weights replace the downloaded ones).
DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14"
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class ConversionError(ValueError):
    """Bad input: the message names the file and, where there is one, the tensor."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def _read_json(path) -> dict:
    if not os.path.exists(path):
        raise ConversionError(f"{path}: missing")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise ConversionError(f"{path}: not valid JSON: {err}") from None


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=None)  # None: only on a terminal


def _counted(get, bar):
    def counted(name):
        value = get(name)
        bar.update()
        return value
    return counted


def _cast(get, dtype):
    if dtype is None:
        return get
    return lambda name: np.asarray(get(name)).astype(dtype, copy=False)


def _check_output(out) -> str:
    """Refuses an output that holds anything (we never delete what we did not write)."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConversionError(f"{out}: already exists and is not empty (remove it or choose "
                              "another --out)")
    return out


@contextlib.contextmanager
def _output_folder(out):
    """Yields a scratch folder that becomes `out` only when the conversion succeeds, so a failed
    run never leaves something that looks like a finished checkpoint."""
    out = _check_output(out)
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(partial, out)


def _has_tokenizer(folder) -> bool:
    return any(os.path.exists(os.path.join(folder, n)) for n in TOKENIZER_FILES)


def _load_tokenizer(folder):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    # AutoTokenizer peeks at config.json and warns that model_type 'valley' is unknown to it.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(os.fspath(folder))
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ...
        raise ConversionError(f"{folder}: cannot load its tokenizer: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _abstract_shapes(cfg: ValleyConfig) -> dict:
    from flax import nnx
    from valley_jax.valley import Valley
    return hf.flat_shapes(nnx.eval_shape(lambda: Valley(cfg, rngs=nnx.Rngs(0))))


def _reraise_with(where, err):
    """Re-raises a KeyError / ValueError as a ConversionError naming `where` (unless the message
    already starts with it)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    where = os.fspath(where)
    raise ConversionError(msg if msg.startswith(where) else f"{where}: {msg}") from None


# ---------------------------------------------------------------------------------------------
# from-hf: pretrained CLIP + LLaMA -> a fresh Valley


def grow_rows(table: np.ndarray, vocab: int, new_rows, num_old: int) -> np.ndarray:
    """An embedding / lm_head table [V0, H] grown to `vocab` rows, where `new_rows` (the ids of
    tokens just added) and any row past V0 start at the mean of the first `num_old` rows, as the
    reference initialises Valley's tokens. The mean is accumulated in float64."""
    out = np.empty((vocab,) + table.shape[1:], table.dtype)
    out[:len(table)] = table
    mean = np.asarray(table[:num_old]).mean(axis=0, dtype=np.float64).astype(table.dtype)
    out[len(table):] = mean
    out[list(new_rows)] = mean
    return out


def _check_llama(meta: dict, path) -> None:
    if meta.get("model_type") != "llama":
        raise ConversionError(f"{path}: model_type {meta.get('model_type')!r} is not 'llama' "
                              "(Valley's decoder is a LLaMA-family LlamaForCausalLM)")
    for flag in ("attention_bias", "mlp_bias"):
        if meta.get(flag):
            raise ConversionError(f"{path}: {flag} is set; valley_jax's LLaMA has no biases")


def _fresh_multimodal(cfg: ValleyConfig, seed: int, dtype) -> dict:
    """Freshly initialised projector and temporal module (v3: sinusoidal position table)."""
    from flax import nnx
    from valley_jax.layers import Policy
    from valley_jax.projector import Projector
    from valley_jax.temporal import make_temporal
    policy = Policy(param_dtype=dtype)
    rngs = nnx.Rngs(seed)
    modules = {"projector": Projector(cfg.vision.width, cfg.llm.hidden, policy, rngs=rngs),
               "temporal": make_temporal(cfg, policy, rngs)}
    return {(name,) + p: v for name, m in modules.items() for p, v in hf.get_flat(m).items()}


def from_hf(vision_dir, llm_dir, out, *, temporal: str = "mean", num_frames: int = 8,
            dtype: str = "auto", seed: int = 0) -> ValleyConfig:
    """A Valley checkpoint from a CLIP folder (CLIPVisionModel or CLIPModel) and a LLaMA-family
    folder with its tokenizer. Valley's tokens are added to the tokenizer; the embedding and
    lm_head grow to the new vocabulary with the new rows at the mean of the old ones."""
    _check_output(out)
    vision_dir, llm_dir = os.fspath(vision_dir), os.fspath(llm_dir)
    vision_path, llm_path = (os.path.join(d, "config.json") for d in (vision_dir, llm_dir))
    try:
        vision = hf.vision_config_from_hf(_read_json(vision_path))
    except (KeyError, ValueError) as err:
        _reraise_with(vision_path, err)
    llm_meta = _read_json(llm_path)
    _check_llama(llm_meta, llm_path)
    vreader, lreader = hf.TensorReader(vision_dir), hf.TensorReader(llm_dir)
    if not _has_tokenizer(llm_dir):
        raise ConversionError(f"{llm_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    tokenizer = _load_tokenizer(llm_dir)

    old_len = len(tokenizer)
    ids = tokens.add_valley_tokens(tokenizer)
    new_ids = sorted(i for i in ids.values() if i >= old_len)
    base_vocab = lreader.shape(EMBED)[0]
    vocab = max(base_vocab, len(tokenizer))
    try:
        llm = hf.llama_config_from_hf({**llm_meta, "vocab_size": vocab})
    except (KeyError, ValueError) as err:
        _reraise_with(llm_path, err)
    cfg = ValleyConfig(vision=vision, llm=llm, temporal=temporal, num_frames=num_frames,
                       im_patch_id=ids["im_patch"], vi_frame_id=ids["vi_frame"])

    # Tied-embedding LLaMAs (e.g. Llama 3.2 1B) store no lm_head: Valley's is untied, a copy.
    head_source = LM_HEAD if LM_HEAD in lreader else EMBED

    def get_llm(name):
        if name in (EMBED, LM_HEAD):
            table = lreader.get(head_source if name == LM_HEAD else name)
            return grow_rows(table, vocab, new_ids, min(old_len, base_vocab))
        return lreader.get(name)

    cast = DTYPES[dtype]
    shapes = _abstract_shapes(cfg)
    vision_entries = hf.clip_entries(vision, hf.clip_prefix(vreader.keys()))
    llm_entries = hf.llama_entries(llm)
    with _output_folder(out) as tmp:
        with _progress(len(vision_entries) + len(llm_entries), "from-hf") as bar:
            flat = hf.assemble(vision_entries, _cast(_counted(vreader.get, bar), cast), shapes,
                               where=vreader.file_of)
            vreader.close()
            flat.update(hf.assemble(llm_entries, _cast(_counted(get_llm, bar), cast), shapes,
                                    where=lreader.file_of))
            lreader.close()
        # Fresh modules take the LLM's dtype unless one is asked for.
        flat.update(_fresh_multimodal(cfg, seed, cast or flat[("llm", "embed")].dtype))
        checkpoint.save_state(tmp, cfg, flat, tokenizer=tokenizer,
                              source={"vision": os.path.abspath(vision_dir),
                                      "llm": os.path.abspath(llm_dir)})
    return cfg


# ---------------------------------------------------------------------------------------------
# from-valley: the authors' released checkpoints (and delta releases)


def _add_in_dtype(delta: np.ndarray, base: np.ndarray, rows: int = 4096) -> np.ndarray:
    """delta + base in the delta's dtype, as the authors' apply_delta.py does (both loaded as
    float16): the base is rounded to that dtype, the sum taken in float32 and rounded once.
    Done in blocks of rows so that large tables need no float32 copy of themselves."""
    out = np.empty(delta.shape, delta.dtype)
    for i in range(0, len(delta), rows):
        d = delta[i:i + rows].astype(np.float32)
        b = base[i:i + rows].astype(delta.dtype).astype(np.float32)
        out[i:i + rows] = (d + b).astype(delta.dtype)
    return out


class DeltaApplier:
    """Tensors of a delta release with its base added: target = delta + base for every tensor
    the base (a LlamaForCausalLM folder) has; the embedding and lm_head rows past the base
    vocabulary (Valley's added tokens) and tensors the base lacks (vision tower, projector,
    temporal module) are the delta's as they are."""

    GROWN = (EMBED, LM_HEAD)

    def __init__(self, delta: hf.TensorReader, base: hf.TensorReader):
        self.delta, self.base = delta, base

    def get(self, name: str) -> np.ndarray:
        delta = self.delta.get(name)
        if name not in self.base:
            return delta
        base = self.base.get(name)
        if delta.shape == base.shape:
            return _add_in_dtype(delta, base)
        if (name in self.GROWN and delta.shape[1:] == base.shape[1:]
                and delta.shape[0] >= base.shape[0]):
            out = np.array(delta)  # a writable copy: the delta may be a read-only mapping
            out[:len(base)] = _add_in_dtype(delta[:len(base)], base)
            return out
        raise ConversionError(f"{name}: delta {self.delta.file_of(name)} has shape "
                              f"{tuple(delta.shape)} but base {self.base.file_of(name)} has "
                              f"{tuple(base.shape)}")


def _check_valley_architecture(meta: dict, path) -> None:
    archs = meta.get("architectures") or []
    if hf.VALLEY_ARCHITECTURE in archs:
        return
    hint = ""
    if meta.get("model_type") == "valley":
        hint = (" (model_type 'valley' is also used by Valley 2.0, ByteDance's Qwen-based "
                "successor: a different model that valley_jax does not convert)")
    raise ConversionError(f"{path}: architectures {archs} does not name "
                          f"{hf.VALLEY_ARCHITECTURE!r}, so this is not a Valley (v1) "
                          f"checkpoint{hint}")


def _media_token_ids(folder, meta: dict, tokenizer) -> tuple[int, int]:
    """(im_patch, vi_frame) ids: from the tokenizer in the folder, else from config.json's
    `im_patch_token` / `vi_frame_token` (the names of the reference's vision-config fields)."""
    if tokenizer is not None:
        ids = []
        for tok in (tokens.IM_PATCH, tokens.VI_FRAME):
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id:
                raise ConversionError(f"{folder}: its tokenizer has no {tok} token")
            ids.append(i)
        return ids[0], ids[1]
    if "im_patch_token" in meta and "vi_frame_token" in meta:
        return int(meta["im_patch_token"]), int(meta["vi_frame_token"])
    raise ConversionError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) and "
                          "config.json has no im_patch_token / vi_frame_token, so the token ids "
                          "that carry the video features are unknown")


def from_valley(model_dir, out, *, base=None, num_frames: int = 8,
                dtype: str = "auto") -> ValleyConfig:
    """A valley_jax checkpoint from the authors' ValleyLlamaForCausalLM folder (safetensors or
    .bin, sharded or not). With `base`, `model_dir` is a delta release over that LLaMA folder."""
    _check_output(out)
    model_dir = os.fspath(model_dir)
    config_path = os.path.join(model_dir, "config.json")
    meta = _read_json(config_path)
    _check_valley_architecture(meta, config_path)
    reader = hf.TensorReader(model_dir)
    tokenizer = _load_tokenizer(model_dir) if _has_tokenizer(model_dir) else None
    im_patch_id, vi_frame_id = _media_token_ids(model_dir, meta, tokenizer)
    keys = reader.keys()
    try:
        cfg = hf.valley_config_from_hf(meta, keys, reader.shape, im_patch_id=im_patch_id,
                                       vi_frame_id=vi_frame_id, num_frames=num_frames)
        entries, packed = hf.valley_key_plan(cfg, keys)
    except (KeyError, ValueError) as err:
        _reraise_with(model_dir, err)
    for name, i in (("im_patch", im_patch_id), ("vi_frame", vi_frame_id)):
        if not 0 <= i < cfg.llm.vocab_size:
            raise ConversionError(f"{model_dir}: {name} token id {i} is outside the "
                                  f"{cfg.llm.vocab_size}-row embedding")

    get = reader.get
    if base is not None:
        get = DeltaApplier(reader, hf.TensorReader(base)).get
    shapes = _abstract_shapes(cfg)
    with _output_folder(out) as tmp:
        with _progress(len(entries) + len(packed), "from-valley") as bar:
            flat = hf.assemble(entries, _cast(_counted(get, bar), DTYPES[dtype]), shapes, packed,
                               where=reader.file_of)
            reader.close()
        source = {"mm_vision_tower": meta.get("mm_vision_tower"),
                  "model": os.path.abspath(model_dir)}
        if base is not None:
            source["base"] = os.path.abspath(os.fspath(base))
        checkpoint.save_state(tmp, cfg, flat, tokenizer=tokenizer, source=source)
    return cfg


# ---------------------------------------------------------------------------------------------
# to-hf: publish a checkpoint


def _special_token_ids(tokenizer_dir) -> dict:
    if tokenizer_dir is None:
        return {}
    tok = _load_tokenizer(tokenizer_dir)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    return {k: v for k, v in ids.items() if v is not None}


def _copy_tokenizer(tokenizer_dir, dest) -> None:
    if tokenizer_dir is None:
        return
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, name), dest)


def _write_tensors(folder, tensors, total: int, desc: str, *, prefix: str, dtype,
                   max_shard_bytes: int) -> str:
    """Writes (name, array) pairs as safetensors shards; returns the name of the dtype most of
    the bytes are in (for config.json's torch_dtype)."""
    writer = hf.ShardedWriter(folder, prefix, max_shard_bytes, dtype)
    bytes_by_dtype: dict[str, int] = {}
    with _progress(total, desc) as bar:
        for name, value in tensors:
            writer.add(name, value)
            key = np.dtype(dtype or value.dtype).name
            bytes_by_dtype[key] = bytes_by_dtype.get(key, 0) + value.nbytes
            bar.update()
    writer.close()
    return max(bytes_by_dtype, key=bytes_by_dtype.get)  # what most of the weights are in


def _with_dead_duplicate(tensors):
    """The authors' v3 model registers the encoder layer it deep-copies into
    `transformer_delta_encoder` as `transforemr_adding_layer` (sic) too; that copy is never run.
    Writing the live weights under the dead name as well makes the key set equal their
    state_dict, so their loader reports nothing missing."""
    for name, value in tensors:
        yield name, value
        if name.startswith(hf.DELTA_ENCODER_PREFIX):
            yield hf.DEAD_DUPLICATE_PREFIX + name[len(hf.DELTA_ENCODER_PREFIX):], value


def _image_processor_config(cfg: ValleyConfig) -> dict:
    """CLIPImageProcessor settings for the exported tower (short side resize, centre crop)."""
    size = cfg.vision.image_size
    return dict(image_processor_type="CLIPImageProcessor", do_resize=True,
                size={"shortest_edge": size}, do_center_crop=True,
                crop_size={"height": size, "width": size}, do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg.pixel_mean),
                image_std=list(cfg.pixel_std), do_convert_rgb=True, resample=3)


def _dump(obj, path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def to_hf(ckpt, out, *, fmt: str = "valley", dtype: str = "auto", vision_tower: str | None = None,
          max_shard_bytes: int = 2 * 1024 ** 3) -> None:
    """Writes a model checkpoint as Hugging Face folders (LoRA adapters merged into the kernels).

    fmt 'valley': the authors' ValleyLlamaForCausalLM layout (config.json, safetensors with
    their key names, tokenizer files), which their code loads.
    fmt 'llama': DIR/llm (LlamaForCausalLM + tokenizer), DIR/vision (CLIPVisionModel +
    preprocessor config), DIR/mm_projector.safetensors (projector and temporal module under the
    authors' names) and DIR/valley.json (the ValleyConfig), loadable by plain transformers.
    """
    if fmt not in ("valley", "llama"):
        raise ConversionError(f"unknown format {fmt!r} (valley or llama)")
    _check_output(out)
    cfg, flat = checkpoint.load_state(ckpt)
    if cfg.llm.lora is not None:
        # Published weights carry no adapters: fold them into the kernels (lora.merge).
        from valley_jax import lora
        merged, cfg = lora.merge(flat, cfg)
        flat = {p: np.asarray(v) for p, v in merged.items()}
    source = checkpoint.load_source(ckpt)
    tokenizer_dir = checkpoint.tokenizer_dir(ckpt)
    special = _special_token_ids(tokenizer_dir)
    cast = DTYPES[dtype]
    shard = dict(dtype=cast, max_shard_bytes=max_shard_bytes)
    with _output_folder(out) as tmp:
        if fmt == "valley":
            entries, packed = hf.valley_entries(cfg), hf.packed_in_proj(cfg)
            dead = sum(e.hf.startswith(hf.DELTA_ENCODER_PREFIX) for e in entries) + len(packed)
            written = _write_tensors(
                tmp, _with_dead_duplicate(hf.export(entries, flat, packed)),
                len(entries) + len(packed) + dead, "to-hf valley", prefix="model", **shard)
            tower = vision_tower or source.get("mm_vision_tower") or DEFAULT_VISION_TOWER
            config = hf.valley_config_to_hf(cfg, tower)
            config.update(special, torch_dtype=written)
            _dump(config, os.path.join(tmp, "config.json"))
            _copy_tokenizer(tokenizer_dir, tmp)
            return

        llm_dir, vision_dir = os.path.join(tmp, "llm"), os.path.join(tmp, "vision")
        entries = hf.llama_entries(cfg.llm)
        written = _write_tensors(llm_dir, hf.export(entries, flat), len(entries), "to-hf llm",
                                 prefix="model", **shard)
        _dump({**hf.llama_config_to_hf(cfg.llm), **special, "torch_dtype": written},
              os.path.join(llm_dir, "config.json"))
        _copy_tokenizer(tokenizer_dir, llm_dir)

        # The `vision_model.` prefix is what both transformers 4 and 5 load for CLIPVisionModel.
        entries = hf.clip_entries(cfg.vision, "vision_model.")
        written = _write_tensors(vision_dir, hf.export(entries, flat), len(entries),
                                 "to-hf vision", prefix="model", **shard)
        _dump({**hf.vision_config_to_hf(cfg.vision), "architectures": ["CLIPVisionModel"],
               "torch_dtype": written}, os.path.join(vision_dir, "config.json"))
        _dump(_image_processor_config(cfg), os.path.join(vision_dir, "preprocessor_config.json"))

        multimodal = [e for e in hf.valley_entries(cfg) if e.path[0] in ("projector", "temporal")]
        packed = hf.packed_in_proj(cfg)
        _write_tensors(tmp, hf.export(multimodal, flat, packed), len(multimodal) + len(packed),
                       "to-hf projector", prefix="mm_projector", **shard)
        _dump({"format": checkpoint.FORMAT, "model": to_dict(cfg)},
              os.path.join(tmp, "valley.json"))


# ---------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)")
    scale = 1024 if m.group(3) and m.group(3).lower() == "ib" else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * scale ** power)


FROM_HF_HELP = """Start a Valley from pretrained weights: a CLIP folder (CLIPVisionModel or a
full CLIPModel) and a LLaMA-family folder (LlamaForCausalLM: safetensors or .bin, sharded or
not) with its tokenizer. Valley's tokens are added to the tokenizer, the embedding and lm_head
grow to the new vocabulary (new rows at the mean of the old ones), the projector and temporal
module are freshly initialised (seeded)."""

FROM_VALLEY_HELP = """Read the authors' released checkpoints (ValleyLlamaForCausalLM: config.json
plus safetensors or pytorch_model*.bin, sharded or not). The temporal module, vocabulary and
vision tower are read off the tensors; the media token ids come from the folder's tokenizer, or
from config.json's im_patch_token / vi_frame_token. With --base, --model is a delta release
(Valley-13b-v1) and the base LLaMA folder is added to it."""

TO_HF_HELP = """Publish a checkpoint. --format valley writes the authors' layout, which their
code loads (config.json, safetensors shards with their key names, tokenizer). --format llama
writes OUT/llm (LlamaForCausalLM + tokenizer), OUT/vision (CLIPVisionModel + image processor
config), OUT/mm_projector.safetensors (projector and temporal module, authors' names) and
OUT/valley.json."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m valley_jax.convert",
        description="Convert weights between Hugging Face folders and valley_jax checkpoints.",
        epilog="examples:\n"
               "  from-hf --vision clip-vit-large-patch14 --llm vicuna-7b --out ckpt\n"
               "  from-valley --model Valley2-7b --out ckpt\n"
               "  from-valley --model Valley-13b-v1-delta --base llama-13b --out ckpt\n"
               "  to-hf --checkpoint ckpt --out Valley-7b-hf --format valley",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("from-hf", help="pretrained CLIP + LLaMA/Vicuna -> a fresh Valley",
                       description=FROM_HF_HELP)
    p.add_argument("--vision", required=True, metavar="DIR",
                   help="CLIPVisionModel or CLIPModel folder")
    p.add_argument("--llm", required=True, metavar="DIR",
                   help="LlamaForCausalLM folder with its tokenizer")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to create")
    p.add_argument("--temporal", default="mean", choices=("mean", "importance", "transformer"),
                   help="temporal module: v1 mean (default), v2 importance, v3 transformer")
    p.add_argument("--num-frames", type=int, default=8, help="frames per video (default 8)")
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES),
                   help="storage dtype (default auto: as in the source folders)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fresh projector and temporal module (default 0)")

    p = sub.add_parser("from-valley", help="the authors' released Valley checkpoints",
                       description=FROM_VALLEY_HELP)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="ValleyLlamaForCausalLM folder (or delta release, with --base)")
    p.add_argument("--base", metavar="DIR", help="LLaMA folder the delta release applies to")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to create")
    p.add_argument("--num-frames", type=int, default=8, help="frames per video (default 8)")
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES),
                   help="storage dtype (default auto: as in the source folder)")

    p = sub.add_parser("to-hf", help="a checkpoint -> Hugging Face folders",
                       description=TO_HF_HELP)
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="valley_jax model checkpoint folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    p.add_argument("--format", required=True, choices=("valley", "llama"))
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES),
                   help="dtype of the written tensors (default auto: as stored)")
    p.add_argument("--vision-tower", metavar="NAME",
                   help="mm_vision_tower to write (valley format; default: the source "
                        f"checkpoint's, else {DEFAULT_VISION_TOWER})")
    p.add_argument("--shard-size", type=parse_size, default="2GB", metavar="SIZE",
                   help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "from-hf":
            from_hf(args.vision, args.llm, args.out, temporal=args.temporal,
                    num_frames=args.num_frames, dtype=args.dtype, seed=args.seed)
        elif args.command == "from-valley":
            from_valley(args.model, args.out, base=args.base, num_frames=args.num_frames,
                        dtype=args.dtype)
        else:
            to_hf(args.checkpoint, args.out, fmt=args.format, dtype=args.dtype,
                  vision_tower=args.vision_tower, max_shard_bytes=args.shard_size)
    except (ValueError, KeyError, OSError) as err:  # bad input: a message, not a traceback
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
