"""Train Valley: `python -m valley_jax.train --config=configs/pretrain.py:demo --workdir=DIR`.

Reads top to bottom: processes and mesh, data, model, optimizer and step, checkpoints (resume),
the loop (logging, evaluation, checkpoints, signals), and the final model export to DIR/model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from valley_jax import checkpoint as model_ckpt
from valley_jax import config as config_lib
from valley_jax import flops as flops_lib
from valley_jax import hf, malloc, optim, qa, sharding
from valley_jax import step as step_lib
from valley_jax.data import pipeline
from valley_jax.data.config import DataConfig, DatasetSpec
from valley_jax.data.text import load_tokenizer, special_token_ids
from valley_jax.layers import Policy
from valley_jax.valley import Valley, fresh_variables

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py:VARIANT).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the model go.")
log = logging.getLogger("valley_jax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ---------------------------------------------------------------------------------------------
# Processes


def maybe_initialize_distributed() -> None:
    """Joins a multi-process run when the environment describes one (TPU pod slices, SLURM,
    or an explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
    env = os.environ
    sharding.size_cpu_thread_pools(env)
    if "cpu" in env.get("JAX_PLATFORMS", ""):
        # CPU processes need a collectives backend to talk to each other (tests, CPU clusters).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]),
            local_device_ids=None)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # cluster auto-detection (SLURM, Cloud TPU)


# ---------------------------------------------------------------------------------------------
# Data


def data_dir(config, workdir: str) -> str:
    """Where `{data}` in dataset paths points: the synthetic world, generated when absent."""
    path = os.path.join(workdir, "data")
    if config.data.synthetic:
        from valley_jax.data import synthetic
        # A stage-2 run started from a stage-1 workdir's model links that run's world when it is
        # the same one, rather than generating it again (~30 s of the demo).
        init = config.init.checkpoint.rstrip("/")
        if jax.process_index() == 0:
            synthetic.generate(path, seed=config.seed, num_train=config.data.synthetic_num_train,
                               copy_from=os.path.join(os.path.dirname(init), "data") if init else None)
        _barrier("synthetic-data")
    return path


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def tokenizer_path(config, data: str, init_checkpoint: str) -> str:
    if config.data.tokenizer:
        return config.data.tokenizer.format(data=data)
    if config.data.synthetic:
        return os.path.join(data, "tokenizer")
    if init_checkpoint and model_ckpt.tokenizer_dir(init_checkpoint):
        return model_ckpt.tokenizer_dir(init_checkpoint)
    raise ValueError("no tokenizer: set config.data.tokenizer, or init.checkpoint (or init.vision "
                     "and init.llm) to a model that has one")


def initial_checkpoint(config, workdir: str, data: str) -> str:
    """The model checkpoint training starts from: init.checkpoint, or Hugging Face CLIP + LLM
    folders converted once into WORKDIR/init (Valley's tokens added, new rows at the mean), or a
    random model whose ViT is pretrained once into WORKDIR/init (init.vision_pretrain_steps), or
    '' for a random start."""
    if config.init.checkpoint:
        return config.init.checkpoint
    if not (config.init.vision or config.init.llm):
        if not config.init.vision_pretrain_steps:
            return ""
        path = os.path.join(workdir, "init")
        if jax.process_index() == 0 and not os.path.exists(os.path.join(path, "config.json")):
            _pretrain_vision_init(config, data, path)
        _barrier("init-checkpoint")
        return path
    if not (config.init.vision and config.init.llm):
        raise ValueError("init.vision and init.llm go together (a CLIP and a LLaMA folder)")
    path = os.path.join(workdir, "init")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(path, "config.json")):
        from valley_jax import convert
        convert.from_hf(config.init.vision, config.init.llm, path, temporal=config.model.temporal,
                        num_frames=config.model.num_frames, seed=config.seed)
    _barrier("init-checkpoint")
    return path


def _pretrain_vision_init(config, data: str, path: str) -> None:
    """Writes to `path` the run's random initial model with its ViT pretrained to tag frames
    (valley_jax/vision_pretrain.py: the demo's stand-in for CLIP)."""
    from valley_jax import vision_pretrain

    tok_path = tokenizer_path(config, data, "")
    cfg = model_config(config, special_token_ids(load_tokenizer(tok_path)), None)
    model = Valley(cfg, policy_from(config), rngs=nnx.Rngs(config.seed))
    records = config.init.vision_pretrain_data.format(data=data)
    dcfg = data_config(config, [dict(path=records)], data, tok_path, cfg.vision.num_patches,
                       train=False)
    frames, *labels = vision_pretrain.tagged_frames(records, os.path.dirname(records), dcfg)
    log.info("vision pretraining: %d frames of %s, %d steps", len(frames), records,
             config.init.vision_pretrain_steps)
    result = vision_pretrain.pretrain(model, frames, *labels,
                                      steps=config.init.vision_pretrain_steps,
                                      lr=config.init.vision_pretrain_lr, seed=config.seed,
                                      patch_colour_weight=config.init.vision_pretrain_colour_weight)
    log.info("vision pretraining done: held-out %s", result)
    # Written by this process alone, as the converters write theirs (save_model is collective).
    model_ckpt.save_state(path, cfg, hf.get_flat(model), tokenizer=tok_path)


def data_config(config, specs, data: str, tok: str, num_patches: int, *, train: bool) -> DataConfig:
    datasets = tuple(DatasetSpec(path=s["path"].format(data=data),
                                 video_root=s.get("video_root", "").format(data=data),
                                 image_root=s.get("image_root", "").format(data=data),
                                 weight=float(s.get("weight", 1.0))) for s in specs)
    return DataConfig(datasets=datasets, tokenizer_path=tok, num_frames=config.model.num_frames,
                      frame_mode=config.data.frame_mode, image_size=config.data.image_size,
                      resize_size=config.data.resize_size, random_crop=train and config.data.random_crop,
                      max_length=config.data.max_length, frame_cache_mb=config.data.frame_cache_mb,
                      num_patches=num_patches, batch_size=config.batch_size,
                      seed=config.seed if train else config.seed + 1, shuffle=train,
                      num_epochs=None if train else 1,
                      num_workers=config.data.num_workers if train else 0)


# ---------------------------------------------------------------------------------------------
# Model


def model_config(config, ids, base: config_lib.ValleyConfig | None) -> config_lib.ValleyConfig:
    """The preset (or the initial checkpoint's config) with the run's choices and token ids."""
    cfg = base or config_lib.preset(config.model.preset)
    vision = dataclasses.replace(cfg.vision, image_size=config.data.image_size)
    lora = None
    if config.stage == "lora":
        lora = config_lib.LoraConfig(rank=config.model.lora_rank, alpha=config.model.lora_alpha,
                                     dropout=config.model.lora_dropout)
    vocab = max(cfg.llm.vocab_size, ids.vocab_size) if base else ids.vocab_size
    llm = dataclasses.replace(cfg.llm, vocab_size=vocab, lora=lora)
    return dataclasses.replace(cfg, vision=vision, llm=llm, temporal=config.model.temporal,
                               num_frames=config.model.num_frames, im_patch_id=ids.im_patch,
                               vi_frame_id=ids.vi_frame)


def build_model(config, cfg: config_lib.ValleyConfig, policy: Policy, init_checkpoint: str) -> Valley:
    """A model checkpoint's weights, or a random init (the demo)."""
    if not init_checkpoint:
        return Valley(cfg, policy, rngs=nnx.Rngs(config.seed))
    model = nnx.eval_shape(lambda: Valley(cfg, policy, rngs=nnx.Rngs(config.seed)))
    flat = hf.get_flat(model_ckpt.load_model(init_checkpoint, policy))
    wanted = hf.flat_shapes(model)
    # Adapters and a temporal module the checkpoint lacks start fresh; all else is loaded.
    fresh = sorted(p for p in wanted if p not in flat)
    if fresh:
        log.info("not in %s, freshly initialised: %s", init_checkpoint,
                 ", ".join(".".join(p) for p in fresh))
    values = {p: flat[p] for p in wanted if p in flat}
    values.update(fresh_variables(cfg, policy, config.seed, fresh))
    try:
        hf.set_flat(model, values)
    except ValueError as e:
        raise ValueError(f"init.checkpoint {init_checkpoint} does not fit this run's model "
                         f"(config.model): {e}") from None
    return model


def policy_from(config) -> Policy:
    return Policy(dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype],
                  scan_layers=config.model.scan_layers, remat=config.model.remat,
                  attention_block=config.model.attention_block)


def batch_shapes(config, cfg: config_lib.ValleyConfig) -> dict:
    """The global batch of the data contract, as shapes (for compiling without data)."""
    b, n, t, s = config.batch_size, config.data.max_length, config.model.num_frames, cfg.vision.image_size
    sds = jax.ShapeDtypeStruct
    return dict(input_ids=sds((b, n), jnp.int32), labels=sds((b, n), jnp.int32),
                attention_mask=sds((b, n), jnp.int32), frames=sds((b, t, s, s, 3), jnp.uint8),
                frame_mask=sds((b, t), jnp.bool_))


@dataclasses.dataclass
class StepSetup:
    graphdef: object
    params: dict  # {path: array}, concrete or abstract like the model given
    trainable: optim.Trainable
    tx: object
    schedule: object
    step: object  # the jitted train step
    state_sh: object  # TrainState of shardings
    batch_sh: dict
    abstract_state: object  # TrainState of ShapeDtypeStructs carrying their shardings


def build_step(config, cfg: config_lib.ValleyConfig, model, mesh, embed_rows_from: int) -> StepSetup:
    """Trainable split, optimizer, shardings and the jitted step for `model` (concrete, or
    abstract from nnx.eval_shape for ahead-of-time compilation)."""
    graphdef, params, axes, param_paths = step_lib.split_model(model)
    trainable = optim.stage_trainable(config.stage, param_paths, embed_rows_from=embed_rows_from,
                                      train_vision=config.model.train_vision)
    tx, schedule = optim.make_optimizer(
        lr=config.optim.lr, total_steps=config.total_steps,
        warmup_steps=math.ceil(config.optim.warmup_ratio * config.total_steps),
        b1=config.optim.b1, b2=config.optim.b2, weight_decay=config.optim.weight_decay,
        grad_clip=config.optim.grad_clip, vision_lr_scale=config.optim.vision_lr_scale)
    step_fn = step_lib.make_step(graphdef, trainable, tx, schedule,
                                 micro_batches=config.micro_batches,
                                 train_vision=config.model.train_vision,
                                 max_learned=config.model.max_learned_tokens, mesh=mesh)
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, trainable, tx), params)
    state_sh = step_lib.tree_shardings(abstract, axes, mesh)
    batch_sh = sharding.batch_shardings(batch_shapes(config, cfg), mesh)
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            abstract, state_sh)
    return StepSetup(graphdef, params, trainable, tx, schedule,
                     step_lib.jit_step(step_fn, state_sh, batch_sh, mesh), state_sh, batch_sh,
                     abstract)


def new_token_rows_from(tokenizer, ids) -> int:
    """The first embedding row of Valley's added tokens ([PAD] when it was added)."""
    if tokenizer.pad_token == "[PAD]" and ids.pad == ids.vi_frame - 1:
        return ids.pad
    return ids.vi_frame


# ---------------------------------------------------------------------------------------------
# Training checkpoints (model + optimizer + step + data iterator + config)


def _flat_state(tree) -> dict:
    """A pytree as {readable name: leaf}: orbax wants string keys; parameter paths are tuples."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = re.sub(r"[^A-Za-z0-9_]+", ".", jax.tree_util.keystr(keypath)).strip(".")
        out[name] = leaf
    return out


def _unflat_state(flat: dict, like):
    leaves = list(_flat_state(like).keys())
    treedef = jax.tree_util.tree_structure(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in leaves])


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options,
                                 item_names=("state", "data"))


def save(mngr, step: int, state, loader, *, force=False) -> None:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_flat_state(state)),
        data=ocp.args.JsonSave(loader.get_state())), force=force)


def restore_latest(mngr, abstract_state):
    """(state, data_state, step) from the newest checkpoint that restores; a damaged one is
    skipped with a warning and the previous one used. None when there is none."""
    target = _flat_state(abstract_state)
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception as err:  # any failure to read it: fall back to an older checkpoint
            log.warning("checkpoint at step %d is damaged (%s: %s); trying the previous one",
                        step, type(err).__name__, str(err).splitlines()[0][:200])
            continue
        return _unflat_state(restored["state"], abstract_state), restored["data"], step
    return None


def host_params(params: dict) -> dict:
    """Every parameter as a full host array (gathered across processes when sharded over them)."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(params, tiled=True)


# ---------------------------------------------------------------------------------------------
# Logging


class Metrics:
    """Progress lines on stdout, TensorBoard events and metrics.jsonl, from process 0 only."""

    def __init__(self, workdir: str):
        self.main = jax.process_index() == 0
        if self.main:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.main:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.jsonl.flush()

    def close(self):
        if self.main:
            self.tb.close()
            self.jsonl.close()


def peak_flops_per_device() -> float:
    """Peak dense FLOP/s of one device, for MFU (bf16 for accelerators; measured on CPU)."""
    kind = jax.devices()[0].device_kind.lower()
    table = {"v5p": 459e12, "v5 lite": 197e12, "v5e": 197e12, "v4": 275e12, "v6": 918e12,
             "h100": 989e12, "h200": 989e12, "a100": 312e12}
    for key, value in table.items():
        if key in kind:
            return value
    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 2 * 1024 ** 3 * 5 / (time.perf_counter() - start) / max(1, jax.local_device_count())


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(config, model, tokenizer, val_loader_fn, eval_step, state, data: str, dcfg) -> dict:
    out = {}
    if config.data.val:
        losses, counts = [], []
        loader = val_loader_fn()
        try:
            for i, batch in enumerate(loader):
                if i >= config.data.val_batches:
                    break
                loss_sum, count = eval_step(state.params, batch)
                losses.append(float(loss_sum))
                counts.append(int(count))
        finally:
            loader.close()
        out["val_loss"] = sum(losses) / max(1, sum(counts))
    for path in config.eval.qa:
        path = path.format(data=data)
        items = qa.qa_items(path, config.eval.max_items)
        preds = qa.answer(model, tokenizer, items, dcfg, os.path.dirname(path),
                          batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens)
        name = os.path.splitext(os.path.basename(path))[0]
        acc = qa.accuracy(items, preds)
        for qtype, s in acc.items():
            out[f"{name}/{qtype}"] = s["exact"]
        log.info("%s", accuracy_table(name, acc, chance_levels(os.path.dirname(path))))
    return out


def chance_levels(folder: str) -> dict:
    """{question type: chance accuracy} from a synthetic world's meta.json, or {}."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            return dict(json.load(f).get("chance", {}))
    except (OSError, ValueError):
        return {}


def accuracy_table(name: str, acc: dict, chance: dict) -> str:
    """Held-out answer accuracy per question type, with its chance level when known."""
    lines = [f"held-out answer accuracy, {name} ({acc.get('all', {}).get('n', 0)} questions):"]
    for qtype, s in acc.items():
        level = f"   chance {chance[qtype]:.3f}" if qtype in chance else ""
        lines.append(f"  {qtype:<14s}{s['exact']:6.3f}   n={s['n']:<4d}{level}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv) -> None:
    del argv
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for noisy in ("absl", "jax", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    train(_CONFIG.value, os.path.abspath(_WORKDIR.value))


# Counts and intervals that must be at least 1 (an interval of 0 crashed the loop at its first
# logged step with ZeroDivisionError).
POSITIVE_FIELDS = ("total_steps", "batch_size", "micro_batches", "log_every", "eval_every",
                   "checkpoint_every", "keep_checkpoints", "model.num_frames",
                   "model.attention_block")


def check_config(config) -> None:
    """Fails before any work on a field out of range, naming it."""
    for name in POSITIVE_FIELDS:
        value = functools.reduce(getattr, name.split("."), config)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name} must be a whole number of at least 1, got {value!r}")


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the training described by `config` in `workdir`; returns the final
    evaluation."""
    check_config(config)
    maybe_initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    log.info("%d processes, %d devices, mesh %s", jax.process_count(), jax.device_count(),
             dict(mesh.shape))
    log.info(malloc.describe())

    # Data.
    data = data_dir(config, workdir)
    init_checkpoint = initial_checkpoint(config, workdir, data)
    tok_path = tokenizer_path(config, data, init_checkpoint)
    tokenizer = load_tokenizer(tok_path)
    ids = special_token_ids(tokenizer)

    # Model.
    base = model_ckpt.load_config(init_checkpoint) if init_checkpoint else None
    cfg = model_config(config, ids, base)
    policy = policy_from(config)
    train_dcfg = data_config(config, config.data.train, data, tok_path, cfg.vision.num_patches,
                             train=True)
    val_dcfg = data_config(config, config.data.val or config.data.train, data, tok_path,
                           cfg.vision.num_patches, train=False)
    model = build_model(config, cfg, policy, init_checkpoint)

    # Optimizer and step.
    setup = build_step(config, cfg, model, mesh, new_token_rows_from(tokenizer, ids))
    graphdef, params, state_sh, batch_sh = setup.graphdef, setup.params, setup.state_sh, setup.batch_sh
    trainable, tx, train_step = setup.trainable, setup.tx, setup.step

    def eval_loss(params, batch):
        m = step_lib.merge_model(graphdef, params)
        logits, _ = m(batch["input_ids"], batch["frames"], batch["frame_mask"],
                      batch["attention_mask"])
        return step_lib.cross_entropy(logits, batch["labels"])

    eval_step = jax.jit(eval_loss, in_shardings=(state_sh.params, batch_sh))

    # Checkpoints: resume from the newest complete one, else start.
    mngr = checkpoint_manager(workdir, config)
    loader = pipeline.Loader(train_dcfg)
    restored = restore_latest(mngr, setup.abstract_state)
    if restored is not None:
        state, data_state, start = restored
        loader.set_state(data_state)
        log.info("resumed from step %d", start)
    else:
        state = jax.jit(lambda p: step_lib.init_state(p, trainable, tx), out_shardings=state_sh)(params)
        start = 0
    del params, model

    metrics = Metrics(workdir)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    step_flops = flops_lib.step_flops(cfg, batch=config.batch_size, seq_len=config.data.max_length,
                                      num_frames=config.model.num_frames, stage=config.stage,
                                      train_vision=config.model.train_vision)["total"]
    peak = peak_flops_per_device() * jax.device_count()
    base_key = jax.random.key(config.seed)
    wait, tokens = 0.0, 0
    last_time = time.perf_counter()
    last_step = start
    step = start

    def to_device(host_batch):
        return pipeline.to_global(host_batch, mesh, sharding.batch_spec(1))

    def evaluate_now(step):
        m = step_lib.merge_model(graphdef, host_params(state.params))
        results = evaluate(config, m, tokenizer, lambda: pipeline.Loader(val_dcfg),
                           lambda p, b: eval_step(p, to_device(b)), state, data, val_dcfg)
        metrics.write(step, "eval", results)
        log.info("eval step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results

    profile_start = config.profile.start_step
    profile_stop = profile_start + config.profile.num_steps if config.profile.num_steps > 0 else -1
    results = {}
    try:
        while step < config.total_steps:
            if step == profile_start and profile_stop > step:
                jax.profiler.start_trace(os.path.join(workdir, "profile"),
                                         create_perfetto_trace=True)
            t0 = time.perf_counter()
            host_batch = next(loader)
            wait += time.perf_counter() - t0
            tokens += int(host_batch["attention_mask"].sum()) * jax.process_count()
            state, m = train_step(state, to_device(host_batch), jax.random.fold_in(base_key, step))
            step += 1
            if step == profile_stop or (step == config.total_steps and profile_start < step < profile_stop):
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                log.info("profile of steps %d-%d written to %s", profile_start + 1, step,
                         os.path.join(workdir, "profile"))
            if step % config.log_every == 0 or step == config.total_steps:
                m = jax.device_get(m)  # waits for the step
                elapsed = time.perf_counter() - last_time
                steps_done = step - last_step
                values = dict(loss=float(m["loss"]), lr=float(m["lr"]),
                              grad_norm=float(m["grad_norm"]),
                              tokens_per_s=tokens / elapsed,
                              mfu=step_flops * steps_done / elapsed / peak,
                              data_wait=wait / elapsed, skipped=sum(loader.skip_counts.values()))
                eta = elapsed / steps_done * (config.total_steps - step)
                log.info("step %d/%d loss %.4f lr %.2e grad %.3f tok/s %.0f MFU %.1f%% "
                         "data-wait %.0f%% skipped %d ETA %s", step, config.total_steps,
                         values["loss"], values["lr"], values["grad_norm"],
                         values["tokens_per_s"], 100 * values["mfu"], 100 * values["data_wait"],
                         values["skipped"], time.strftime("%H:%M:%S", time.gmtime(eta)))
                metrics.write(step, "train", {**values, "skips": loader.skip_counts})
                wait, tokens = 0.0, 0
                last_time, last_step = time.perf_counter(), step
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                save(mngr, step, state, loader)
            if step % config.eval_every == 0 and step < config.total_steps:
                evaluate_now(step)
            if stop["signal"] is not None:
                log.info("signal %d: checkpointing step %d and exiting", stop["signal"], step)
                save(mngr, step, state, loader, force=True)
                mngr.wait_until_finished()
                sys.exit(128 + stop["signal"])
        mngr.wait_until_finished()
        results = evaluate_now(step)
        # The trained model, in the format chat / evaluation / stage 2 read.
        final = step_lib.merge_model(graphdef, host_params(state.params))
        model_ckpt.save_model(os.path.join(workdir, "model"), final, tokenizer)
        _barrier("model-written")  # no process leaves (and shuts the cluster down) before it
        log.info("model written to %s", os.path.join(workdir, "model"))
    finally:
        loader.close()
        mngr.close()
        metrics.close()
    return results


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
