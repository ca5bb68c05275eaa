"""Train-step speed: the jitted valley_jax step against a PyTorch eager step, same run.

Both sides train the same architecture from the same weights (the PyTorch side is the parity
reference of tests/torch_reference.py: Hugging Face CLIP + LLaMA, the projector and the temporal
module), on the same batch, with AdamW over the same trained parameters (stage 2: projector,
temporal module, LLM; the ViT frozen), in float32 on this machine's CPU threads.

    python bench/train_step.py [--configs demo,large] [--steps 3] [--json out.json]
    LD_PRELOAD=libtcmalloc_minimal.so.4 python bench/train_step.py   # both sides on tcmalloc

The two sides step in turn (`timed_in_turn`); a side's rate is one over its median step time.
Prints steps/s of each side and their ratio, the first-step losses of both (they must agree:
the same model), and for every config the step's model FLOPs, its achieved FLOP/s and its MFU
against the measured rate of a large float32 matmul in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_reference as ref  # noqa: E402
from valley_jax import flops, hf, malloc, optim, sharding  # noqa: E402
from valley_jax import step as step_lib  # noqa: E402
from valley_jax.config import ValleyConfig  # noqa: E402
from valley_jax.layers import Policy  # noqa: E402

CONFIGS = {
    # The demo model's sizes as of session 23 (its LLM's 4 heads sharing 2 key-value heads; 8
    # with their own since), at 224 px, 8 frames; layers unrolled, as configs/*.py:demo run them.
    "demo": dict(scan_layers=False,
        vision=dict(image_size=224, patch_size=14, hidden_size=64, num_hidden_layers=3,
                    num_attention_heads=4, intermediate_size=128),
        llama=dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=256),
        batch=8, seq=384, frames=8, temporal_mlp=256),
    # LLM width 1024, 8 layers, 1024 tokens, 8 frames (the demo ViT in front); layers scanned.
    "large": dict(scan_layers=True,
        vision=dict(image_size=224, patch_size=14, hidden_size=64, num_hidden_layers=3,
                    num_attention_heads=4, intermediate_size=128),
        llama=dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816),
        batch=1, seq=1024, frames=8, temporal_mlp=2048),
}


def make_batch(spec, num_patches, seed=0):
    rng = np.random.default_rng(seed)
    b, s, t = spec["batch"], spec["seq"], spec["frames"]
    ids = rng.integers(3, 100, (b, s)).astype(np.int32)
    media = ref.media_ids(num_patches, t)
    ids[:, 1:1 + len(media)] = media
    labels = ids.copy()
    labels[:, : 1 + len(media) + 16] = -100  # learn the answer part only
    frames = rng.integers(0, 256, (b, t, 224, 224, 3), dtype=np.uint8)
    return dict(input_ids=ids, labels=labels, attention_mask=np.ones((b, s), np.int32),
                frames=frames, frame_mask=np.ones((b, t), bool))


def torch_side(spec, batch):
    clip = ref.tiny_clip(0, **spec["vision"])
    llama = ref.tiny_llama(1, **spec["llama"], max_position_embeddings=4096)
    temporal = ref.TemporalReference("mean", (224 // 14) ** 2, spec["llama"]["hidden_size"])
    model = ref.ValleyReference(clip, llama, temporal).train()
    clip.eval()
    trained = [p for n, p in model.named_parameters() if not n.startswith("clip.")]
    for p in clip.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(trained, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.from_numpy(batch["input_ids"]).long()
    labels = torch.from_numpy(batch["labels"]).long()
    mask = torch.from_numpy(batch["attention_mask"])
    pixels = [ref.normalise(f) for f in batch["frames"]]

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model.logits(ids, pixels, mask)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        return loss.item()

    return model, step


def jax_side(cfg: ValleyConfig, sd, batch, scan_layers=True):
    model = hf.valley_from_tensors(cfg, sd.keys(), sd.__getitem__,
                                   policy=Policy(scan_layers=scan_layers))
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params, axes, param_paths = step_lib.split_model(model)
    trainable = optim.stage_trainable("finetune", param_paths)
    tx, schedule = optim.make_optimizer(lr=1e-5, total_steps=1000, warmup_steps=0, b2=0.95)
    fn = step_lib.make_step(graphdef, trainable, tx, schedule, mesh=mesh)
    state = step_lib.init_state(params, trainable, tx)
    state_sh = step_lib.tree_shardings(state, axes, mesh)
    batch_sh = sharding.batch_shardings(batch, mesh)
    jitted = step_lib.jit_step(fn, state_sh, batch_sh, mesh)
    state = jax.device_put(state, state_sh)
    device_batch = jax.device_put(batch, batch_sh)
    holder = {"state": state}

    def step():
        holder["state"], metrics = jitted(holder["state"], device_batch, None)
        return float(metrics["loss"])  # blocks until the step is done

    return step


def timed_in_turn(steps: dict, n: int):
    """First losses and median step times of each side in `steps` ({name: step()}): after a
    warm-up step each (compilation), the sides take one step each in turn, `n` rounds, so a
    change in this VM's speed during the run (tens of per cent between minutes) reaches both
    sides alike rather than the one that happened to run then."""
    first = {name: step() for name, step in steps.items()}
    times = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return first, {name: float(np.median(t)) for name, t in times.items()}


def matmul_rate(n=2048, reps=5):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def run(name, steps):
    spec = CONFIGS[name]
    torch.manual_seed(0)
    num_patches = (224 // 14) ** 2
    batch = make_batch(spec, num_patches)
    model, torch_step = torch_side(spec, batch)
    sd = {k: v.numpy() for k, v in model.valley_state_dict().items()}
    cfg = ValleyConfig(vision=hf.vision_config_from_hf(model.clip.config.to_dict()),
                       llm=hf.llama_config_from_hf(model.llama.config.to_dict()), temporal="mean",
                       num_frames=spec["frames"], im_patch_id=ref.IM_PATCH_ID,
                       vi_frame_id=ref.VI_FRAME_ID)
    jax_step = jax_side(cfg, sd, batch, spec["scan_layers"])
    first, median = timed_in_turn({"jax": jax_step, "torch": torch_step}, steps)
    jax_loss, torch_loss, jax_time, torch_time = (first["jax"], first["torch"], median["jax"],
                                                  median["torch"])
    fl = flops.step_flops(cfg, batch=spec["batch"], seq_len=spec["seq"], num_frames=spec["frames"],
                          stage="finetune")["total"]
    peak = matmul_rate()
    return dict(config=name, batch=spec["batch"], seq=spec["seq"], frames=spec["frames"],
                jax_steps_per_s=1 / jax_time, torch_steps_per_s=1 / torch_time,
                speedup=torch_time / jax_time, jax_first_loss=jax_loss, torch_first_loss=torch_loss,
                step_tflop=fl / 1e12, jax_tflops=fl / jax_time / 1e12,
                matmul_tflops=peak / 1e12, mfu=fl / jax_time / peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="demo,large")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPU cores, memory allocator "
          f"{malloc.active() or 'glibc (the system)'}")
    results = []
    for name in args.configs.split(","):
        r = run(name, args.steps)
        results.append(r)
        print(f"{name}: valley_jax {r['jax_steps_per_s']:.3f} steps/s, PyTorch eager "
              f"{r['torch_steps_per_s']:.3f} steps/s, ratio {r['speedup']:.2f}x | first loss "
              f"{r['jax_first_loss']:.4f} vs {r['torch_first_loss']:.4f} | "
              f"{r['step_tflop']:.3f} TFLOP/step, {r['jax_tflops'] * 1e3:.1f} GFLOP/s, "
              f"matmul {r['matmul_tflops'] * 1e3:.1f} GFLOP/s, MFU {100 * r['mfu']:.1f}%",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
