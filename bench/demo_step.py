"""The demo's stage-2 train step as the trainer runs it, fed by its Grain loader: what the frame
cache (`data.frame_cache_mb`) and the learned-token loss (`model.max_learned_tokens`) each save,
side by side in one run.

    LD_PRELOAD=libtcmalloc_minimal.so.4 python bench/demo_step.py [--steps 60] [--repeats 3]

Variants, each its own loader (2 worker processes, as `configs/finetune.py:demo`) and jitted step:

  before:   no frame cache, logits at every position (the demo up to session 20)
  cache:    decoded frames kept by each worker (512 MB), logits at every position
  both:     the cache and the lm_head on at most 24 learned tokens a row (the demo now)
  block512: both, with the LLM's causal attention in one block of 168 query rows over all 168
            keys (the demo up to session 24; three blocks of 56 since, `model.attention_block`)
  4heads:   block512, with the demo LLM's attention up to session 23 (4 heads of 32 sharing 2
            key-value heads; 8 heads of 16 with their own since): what the 8 heads cost

The model is the demo's (`configs/finetune.py:demo`: temporal transformer, 4 frames of 112 px,
the ViT trained, max length 168, batch 16) at its random initialisation, on a synthetic world of
`--scenes` train scenes generated into `--workdir` (their QA and captions mixed 1:1 as the demo
does). Every loader first reads two epochs, so that the cached variants hit their cache, as
they do for ~7 of stage 2's ~8 epochs; then the variants take turns: `--steps` steps each, per
repeat. Reported: median seconds per step (wall clock, the loader included, as the trainer's
tokens/s), each repeat's ratios against the first variant (`before`
unless `--variants` says otherwise), and the CPU seconds per step of this process
and all the workers (the other variants' workers idle once their prefetch buffers are full).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, ROOT)

import finetune  # noqa: E402  (configs/finetune.py)
import jax  # noqa: E402

import test_data_fixtures  # noqa: E402,F401  (marks absl flags parsed for the workers)
from loader import process_tree_cpu_seconds  # noqa: E402
from valley_jax import sharding, train  # noqa: E402
from valley_jax import step as step_lib  # noqa: E402
from valley_jax.data import pipeline, synthetic  # noqa: E402
from valley_jax.data.text import load_tokenizer, special_token_ids  # noqa: E402

VARIANTS = {"before": dict(frame_cache_mb=0, max_learned_tokens=0, attention_block=512),
            "cache": dict(frame_cache_mb=512, max_learned_tokens=0, attention_block=512),
            "both": dict(frame_cache_mb=512, max_learned_tokens=24),
            "block512": dict(frame_cache_mb=512, max_learned_tokens=24, attention_block=512),
            "4heads": dict(frame_cache_mb=512, max_learned_tokens=24, attention_block=512,
                           llm=dict(heads=4, kv_heads=2, head_dim=32))}


class Variant:
    def __init__(self, name, config, data, mesh, llm=None):
        self.name = name
        tok = train.tokenizer_path(config, data, "")
        tokenizer = load_tokenizer(tok)
        ids = special_token_ids(tokenizer)
        cfg = train.model_config(config, ids, None)
        if llm:
            cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **llm))
        model = train.build_model(config, cfg, train.policy_from(config), "")
        setup = train.build_step(config, cfg, model, mesh, train.new_token_rows_from(tokenizer, ids))
        self.step = setup.step
        self.state = jax.jit(lambda p: step_lib.init_state(p, setup.trainable, setup.tx),
                             out_shardings=setup.state_sh)(setup.params)
        dcfg = train.data_config(config, config.data.train, data, tok, cfg.vision.num_patches,
                                 train=True)
        self.loader = pipeline.Loader(dcfg)
        self.mesh = mesh
        self.key = jax.random.key(0)
        self.steps_done = 0

    def run(self, steps: int) -> tuple[float, float]:
        """(seconds per step, CPU seconds per step of this process and the workers) over `steps`."""
        jax.block_until_ready(self.state)
        start, cpu = time.perf_counter(), process_tree_cpu_seconds()
        for _ in range(steps):
            batch = pipeline.to_global(next(self.loader), self.mesh, sharding.batch_spec(1))
            self.state, _ = self.step(self.state, batch, jax.random.fold_in(self.key, self.steps_done))
            self.steps_done += 1
        jax.block_until_ready(self.state)
        return (time.perf_counter() - start) / steps, (process_tree_cpu_seconds() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenes", type=int, default=200, help="train scenes of the world")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "valley_demo_step_bench"))
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated; ratios are against the first")
    args = parser.parse_args()

    data = os.path.join(args.workdir, "data")
    synthetic.generate(data, num_train=args.scenes)
    mesh = sharding.make_mesh(-1, 1, 1)
    variants = []
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    for name in names:
        fields = VARIANTS[name]
        config = finetune.get_config("demo")
        with config.unlocked():
            config.data.frame_cache_mb = fields["frame_cache_mb"]
            config.model.max_learned_tokens = fields["max_learned_tokens"]
            config.model.attention_block = fields.get("attention_block",
                                                      config.model.attention_block)
        variants.append(Variant(name, config, data, mesh, fields.get("llm")))
    records = 0
    for name in ("stage1.json", "stage2.json"):
        with open(os.path.join(data, name)) as f:
            records += len(json.load(f))
    warm = 2 * records // config.batch_size
    print(f"{records} records; warming each variant up for {warm} steps (two epochs)")
    for v in variants:
        v.run(warm)
    times = {v.name: [] for v in variants}
    cpu = {v.name: [] for v in variants}
    try:
        for r in range(args.repeats):
            for v in variants:
                t, c = v.run(args.steps)
                times[v.name].append(t)
                cpu[v.name].append(c)
            print(f"repeat {r + 1}: " + ", ".join(
                f"{v.name} {times[v.name][-1] * 1e3:.0f} ms" for v in variants), flush=True)
    finally:
        for v in variants:
            v.loader.close()
    result = {"backend": jax.default_backend(), "cores": os.cpu_count(), "steps": args.steps,
              "repeats": args.repeats, "variants": {}}
    base = times[names[0]]
    for v in variants:
        ratios = [b / t for b, t in zip(base, times[v.name])]
        result["variants"][v.name] = dict(
            ms_per_step=1e3 * statistics.median(times[v.name]),
            speedup=statistics.median(ratios), speedup_per_repeat=ratios,
            cpu_ms_per_step=1e3 * statistics.median(cpu[v.name]))
        print(f"{v.name:7s} {1e3 * statistics.median(times[v.name]):6.1f} ms/step  "
              f"x{statistics.median(ratios):.2f} (" + ", ".join(f"{x:.2f}" for x in ratios) + ")  "
              f"CPU {1e3 * statistics.median(cpu[v.name]):5.0f} ms/step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
