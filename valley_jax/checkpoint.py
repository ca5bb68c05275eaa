"""Model checkpoints: one folder holding what is needed to run a Valley model.

    CKPT/config.json     the ValleyConfig (valley_jax.config.to_dict), a format version and,
                         optionally, `source`: facts about where the weights came from that the
                         config does not hold (e.g. the authors' `mm_vision_tower` hub id)
    CKPT/state/          every model variable, saved with orbax (nested dict of arrays)
    CKPT/tokenizer/      the Hugging Face tokenizer with Valley's tokens (optional)

Written by the converter (`python -m valley_jax.convert`) and the trainer's final export; read
by chat, evaluation, conversion back to Hugging Face, and stage-2 initialisation. Training
checkpoints (with optimizer and data state) are the trainer's own, in its workdir.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from valley_jax import config as config_lib
from valley_jax import hf, tokens
from valley_jax.layers import Policy
from valley_jax.valley import Valley

FORMAT = "valley_jax.model/1"


def _nested(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _flatten(tree: dict, prefix=()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _fresh_folder(path) -> str:
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def _write_meta(path, cfg: config_lib.ValleyConfig, tokenizer, source) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        # A plain LLaMA tokenizer folder (the trainer's data tokenizer): saved with Valley's
        # tokens added, at the ids the model was built with, so that the checkpoint is whole.
        import transformers
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer),
                                                               local_files_only=True)
        tokens.add_valley_tokens(tokenizer)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    meta = {"format": FORMAT, "model": config_lib.to_dict(cfg)}
    if source:
        meta["source"] = dict(source)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)


def save_model(path, model: Valley, tokenizer=None) -> None:
    """Writes a model checkpoint folder (replacing one that is there). `tokenizer`: a Hugging
    Face tokenizer, or a tokenizer folder (Valley's tokens are added when it lacks them). In a
    multi-process run every process calls it (orbax's save is collective); process 0 writes the
    files."""
    primary = jax.process_index() == 0
    path = _fresh_folder(path) if primary else os.path.abspath(os.fspath(path))
    flat = {p: v[...] for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "state"), _nested({tuple(p): v for p, v in flat.items()}))
    if primary:
        _write_meta(path, model.cfg, tokenizer, None)


def _numpy_registry():
    """Orbax's handlers, except that numpy arrays are written without the defensive deep copy
    orbax makes by default: the converters hand over arrays nobody modifies, and the copy would
    double the host memory of a 7B/13B conversion."""
    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.ArrayHandler()))


def save_state(path, cfg: config_lib.ValleyConfig, flat: dict, tokenizer=None,
               source: dict | None = None) -> None:
    """Writes a model checkpoint folder (replacing one that is there) from a flat state
    {parameter path: numpy array}, as the converters build it, without materialising a model.

    Arrays are stored in their own dtype (`load_model` casts to the policy's). The state must
    hold exactly the variables of a Valley model of `cfg`, with their shapes. `tokenizer` is a
    folder to copy or a Hugging Face tokenizer to save; `source` goes into config.json.
    """
    model = nnx.eval_shape(lambda: Valley(cfg, Policy(), rngs=nnx.Rngs(0)))
    want = hf.flat_shapes(model)
    missing, unknown = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    if missing or unknown:
        raise KeyError(f"state does not match the model: missing {missing[:5]}, "
                       f"unknown {unknown[:5]}")
    for p, shape in want.items():
        if tuple(flat[p].shape) != shape:
            raise ValueError(f"{'.'.join(p)}: shape {tuple(flat[p].shape)}, expected {shape}")
    path = _fresh_folder(path)
    # Uncompressed: with OCDBT, tensorstore's compressed output stays resident until the save
    # ends (+0.78 GiB per GiB of bfloat16 weights, see BENCHMARKS.md "Weight conversion"); the
    # price is ~30% more disk for bfloat16 weights.
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
            type_handler_registry=_numpy_registry(), use_compression=False)) as ckptr:
        ckptr.save(os.path.join(path, "state"), args=ocp.args.PyTreeSave(_nested(flat)))
    _write_meta(path, cfg, tokenizer, source)


def _read_meta(path) -> dict:
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (is {path} a valley_jax model checkpoint?)")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_config(path) -> config_lib.ValleyConfig:
    return config_lib.from_dict(_read_meta(path)["model"])


def load_source(path) -> dict:
    """The `source` facts a converter recorded in config.json (empty if none)."""
    return dict(_read_meta(path).get("source") or {})


def load_state(path) -> tuple[config_lib.ValleyConfig, dict]:
    """The config and flat state {parameter path: numpy array} of a model checkpoint, each
    array in the dtype it was saved in; no model or device arrays are built (for exporting)."""
    path = os.path.abspath(os.fspath(path))
    cfg = load_config(path)
    model = nnx.eval_shape(lambda: Valley(cfg, Policy(), rngs=nnx.Rngs(0)))
    args = {p: ocp.RestoreArgs(restore_type=np.ndarray) for p in hf.flat_shapes(model)}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(os.path.join(path, "state"),
                                 args=ocp.args.PyTreeRestore(restore_args=_nested(args)))
    return cfg, _flatten(restored)


def load_model(path, policy: Policy = Policy(), shardings=None) -> Valley:
    """Restores a model checkpoint. `shardings` (a function path -> jax.sharding.Sharding)
    restores each array directly into its sharding; by default arrays land on one device."""
    path = os.path.abspath(os.fspath(path))
    cfg = load_config(path)
    model = nnx.eval_shape(lambda: Valley(cfg, policy, rngs=nnx.Rngs(0)))
    shapes = hf.flat_shapes(model)
    dtypes = {tuple(p): v.get_value().dtype for p, v in nnx.iter_graph(model)
              if isinstance(v, nnx.Variable)}
    target = {p: jax.ShapeDtypeStruct(s, dtypes[p], sharding=shardings(p) if shardings else None)
              for p, s in shapes.items()}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(path, "state"), _nested(target))
    hf.set_flat(model, {p: np.asarray(v) if shardings is None else v
                        for p, v in _flatten(restored).items()})
    return model


def tokenizer_dir(path) -> str | None:
    d = os.path.join(os.fspath(path), "tokenizer")
    return d if os.path.isdir(d) else None
