"""Model checkpoints: one folder holding what is needed to run a Valley model.

    CKPT/config.json     the ValleyConfig (valley_jax.config.to_dict) and a format version
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
from valley_jax import hf
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


def save_model(path, model: Valley, tokenizer_dir=None) -> None:
    """Writes a model checkpoint folder (replacing one that is there)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    flat = {p: v[...] for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "state"), _nested({tuple(p): v for p, v in flat.items()}))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, os.path.join(path, "tokenizer"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"format": FORMAT, "model": config_lib.to_dict(model.cfg)}, f, indent=2)


def load_config(path) -> config_lib.ValleyConfig:
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (is {path} a valley_jax model checkpoint?)")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return config_lib.from_dict(meta["model"])


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
