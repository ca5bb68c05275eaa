"""Generation speed: valley_jax's decode against transformers' `generate` on the same weights,
the decode step's time against the cache length, and the time to first token of a chat about
an 8-frame video.

    python bench/generate.py [--threads N] [--new-tokens 64] [--prompt 60] [--batches 1,8]
                             [--parts decode,cache,first_token] [--json PATH]

Decode. A Valley with one of two LLaMA decoders, `demo` (the demo model's: width 128, 2
layers, vocabulary 1024; 0.4M parameters) and `small` (width 512, 8 layers, 8 heads, MLP 1408,
vocabulary 32000; 58M parameters), and a tiny ViT in front that text prompts never run, gets
random weights; it is saved as a checkpoint and exported with `convert.to_hf(...,
fmt="llama")`, and transformers loads that export as a LlamaForCausalLM. Both sides then
generate greedily, float32, on the CPU, from the same text-only prompts (random ids, all
`--prompt` long), exactly `--new-tokens` new tokens (no EOS, no stop). A side's decode rate is
B x (N - 1) / (t(N) - t(1)): the time of N new tokens less the time of 1 (prefill and first
token), each the best of `--repeats` rounds after a warm-up round (compilation not counted),
every round timing all the sides one after the other (`decode_rates`). valley_jax is timed
both ways: `generate` (the decode loop fused in one jitted while_loop, batch evaluation) and
`stream` (one jitted step per token called from Python, what chat uses). The first prompt's
greedy tokens of both libraries are compared. `--threads N` gives both libraries N CPU threads
(XLA: one Eigen thread when N is 1; torch: set_num_threads); by default each uses its own
default (all cores).

Cache length. Time of one decode step of the `small` decoder (one token per row, jitted, cache
donated) at batch 1 and 8 with 128 and 2048 cache slots: through `Llama.__call__` with its
cache (what generation ran before) and through `generate`'s decode step (its own cache layout,
written in place).

Time to first token. A `demo`-size Valley (valley_jax.config.preset('demo'): ViT width 64 at
112 px as the demo trains it, LLM width 128) with a sentencepiece tokenizer, asked about a
synthetic 8-frame video through `chat.Session`: the time from `ask` to its first generated token
(frames decoded, resized and cropped; prompt tokenised; prefill; first token sampled), after a
warm-up ask that compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of each side "
                        "(default 0: each library's default)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=60)
    parser.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default="decode,cache,first_token",
                        type=lambda s: s.split(","), help="what to measure (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:
    # XLA reads its flags once, when jax initialises: they must be set before the import.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               "false intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from valley_jax import chat, checkpoint, convert, hf, tokens  # noqa: E402
from valley_jax import generate as gen  # noqa: E402
from valley_jax.config import LlamaConfig, ValleyConfig, VisionConfig, preset  # noqa: E402
from valley_jax.data import synthetic  # noqa: E402
from valley_jax.data.text import load_tokenizer  # noqa: E402
from valley_jax.layers import Policy  # noqa: E402
from valley_jax.valley import Valley  # noqa: E402

LLMS = {
    # The demo model's decoder (valley_jax.config.preset('demo')): per-token work is tiny, so a
    # library's per-step overhead decides.
    "demo": preset("demo").llm,
    # 58M parameters: per-token arithmetic and weight reads decide.
    "small": LlamaConfig(vocab_size=32000, hidden=512, depth=8, heads=8, kv_heads=8, head_dim=64,
                         mlp_dim=1408, max_position=2048),
}
TINY_VISION = VisionConfig(image_size=28, patch_size=14, width=16, depth=1, heads=2, mlp_dim=32)


def random_model(cfg: ValleyConfig, seed: int = 0) -> Valley:
    """Random weights from numpy: normal(0, 0.02) kernels (Hugging Face's LLaMA init), unit
    norm scales."""
    model = nnx.eval_shape(lambda: Valley(cfg, Policy(), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in hf.flat_shapes(model).items():
        value = np.ones(shape) if path[-1] == "scale" else 0.02 * rng.standard_normal(shape)
        flat[path] = value.astype(np.float32)
    hf.set_flat(model, flat)
    return model


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_rates(runs: dict, batch: int, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of decode of each side in `runs` ({name: run(n)}): B x (N - 1) / (t(N) - t(1)),
    and of the whole call at N. The sides are timed in turn, round after round (`repeats`
    rounds after a warm-up one), and each keeps its best time: a change in this VM's speed
    during the run reaches every side, not one of them (it varies by tens of per cent between
    minutes; BENCHMARKS.md "Generation")."""
    best = {(name, n): float("inf") for name in runs for n in (new_tokens, 1)}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            for n in (new_tokens, 1):
                start = time.perf_counter()
                run(n)
                if round_:  # round 0 compiles and warms the caches
                    best[name, n] = min(best[name, n], time.perf_counter() - start)
    out = {}
    for name in runs:
        t_n, t_1 = best[name, new_tokens], best[name, 1]
        out[name] = {"decode_tok_s": batch * (new_tokens - 1) / (t_n - t_1),
                     "total_tok_s": batch * new_tokens / t_n, "t_N_s": t_n, "t_1_s": t_1}
    return out


def bench_decode(args, name: str, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    llm = LLMS[name]
    cfg = ValleyConfig(vision=TINY_VISION, llm=llm, temporal_mlp_dim=32,
                       im_patch_id=llm.vocab_size - 2, vi_frame_id=llm.vocab_size - 1)
    model = random_model(cfg)
    checkpoint.save_model(workdir / name / "ckpt", model)
    convert.to_hf(workdir / name / "ckpt", workdir / name / "hf", fmt="llama")
    torch_model = AutoModelForCausalLM.from_pretrained(workdir / name / "hf" / "llm",
                                                       dtype=torch.float32).eval()
    params = sum(int(np.prod(s)) for p, s in hf.flat_shapes(model.llm).items())

    results = {"llm": dataclasses.asdict(llm), "llm_params": params}
    rng = np.random.default_rng(0)
    for batch in args.batches:
        prompts = rng.integers(3, llm.vocab_size - 8, (batch, args.prompt)).astype(np.int32)

        def ours(n, prompts=prompts):
            out = gen.generate(model, list(prompts), sampling=gen.SamplingConfig(max_new_tokens=n))
            assert all(len(o) == n for o in out)
            return out

        def ours_streamed(n, prompts=prompts):
            steps = list(gen.stream(model, list(prompts),
                                    sampling=gen.SamplingConfig(max_new_tokens=n)))
            assert len(steps) == n
            return steps

        ids = torch.from_numpy(prompts.astype(np.int64))

        def theirs(n):
            with torch.inference_mode():
                out = torch_model.generate(ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           pad_token_id=0)
            assert out.shape[1] == args.prompt + n
            return out[:, args.prompt:]

        row = decode_rates({"valley_jax": ours, "valley_jax_stream": ours_streamed,
                            "transformers": theirs}, batch, args.new_tokens, args.repeats)
        same = ours(args.new_tokens)[0] == theirs(args.new_tokens)[0].tolist()
        row["same_greedy_tokens_row0"] = same
        for key in ("valley_jax", "valley_jax_stream"):
            row[f"ratio_{key}"] = row[key]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
        results[f"batch_{batch}"] = row
        print(json.dumps({f"{name}_batch_{batch}": row}), flush=True)
    return results


def bench_first_token(args, workdir: Path) -> dict:
    words = "red green blue square circle triangle moves left right up down first then".split()
    texts = [tokens.SYSTEM_V1] + [f"### Human: Which colour is the {w}?\n### Assistant: {v}"
                                  for w in words for v in words]
    tokenizer = load_tokenizer(str(synthetic.train_tokenizer(texts, workdir / "tok", 768)))
    demo = preset("demo")
    cfg = dataclasses.replace(
        demo, vision=dataclasses.replace(demo.vision, image_size=112),
        llm=dataclasses.replace(demo.llm, vocab_size=len(tokenizer)),
        im_patch_id=tokenizer.convert_tokens_to_ids(tokens.IM_PATCH),
        vi_frame_id=tokenizer.convert_tokens_to_ids(tokens.VI_FRAME))
    session = chat.Session(random_model(cfg, seed=1), tokenizer, notify=lambda _: None)
    video = workdir / "clip.mp4"
    frames = np.random.default_rng(0).integers(0, 256, (48, 112, 112, 3), np.uint8)
    synthetic.write_video(video, frames)

    def first_token():
        session.reset()
        session._loaded = None  # decode the video every time, as a new question about it would
        session.ask("What moves, and which way?", video=str(video), max_new_tokens=1)

    start = time.perf_counter()
    first_token()
    cold = time.perf_counter() - start
    warm = best_time(first_token, args.repeats)

    def read_frames():
        session._loaded = None
        session.frames(video=str(video))

    def ask_on_read_frames():  # the frames already read: tokenise, prefill, first token
        session.reset()
        session.ask("What moves, and which way?", video=str(video), max_new_tokens=1)

    return {"prompt_tokens": len(session.last.prompt_ids),
            "frames": session.data_config.num_frames, "image_size": cfg.vision.image_size,
            "first_token_s": warm, "first_call_with_compile_s": cold,
            "video_frames_only_s": best_time(read_frames, args.repeats),
            "prompt_prefill_first_token_only_s": best_time(ask_on_read_frames, args.repeats)}


def bench_cache_length(model: Valley, repeats: int) -> dict:
    llm = model.llm
    graphdef, state = nnx.split(llm)

    def through_llama(state, layers, token, pos, cache):
        m = nnx.merge(graphdef, state)
        logits, cache = m(m.embed_tokens(token[:, None]), pos[:, None],
                          jnp.ones((token.shape[0], 1), bool), cache)
        return logits[:, -1], cache

    def through_generate(state, layers, token, pos, cache):
        return gen._decode_forward(nnx.merge(graphdef, state), token, pos, cache, layers)

    results = {}
    for name, fn in (("llama_call", through_llama), ("generate_step", through_generate)):
        step = jax.jit(fn, donate_argnums=(4,))
        layers = jax.jit(gen.copied_layers)(llm) if name == "generate_step" else None
        for batch in (1, 8):
            for slots in (128, 2048):
                cache = llm.init_cache(batch, slots)
                if name == "generate_step":  # its layout: one [B * kv_heads, slots, D] per layer
                    cache = gen.decode_cache(cache)
                box = [dict(cache, index=jnp.int32(60))]
                token, pos = jnp.zeros((batch,), jnp.int32), jnp.full((batch,), 60, jnp.int32)

                def run():
                    logits, box[0] = step(state, layers, token, pos, box[0])
                    logits.block_until_ready()

                results[f"{name}_b{batch}_s{slots}_ms"] = 1000 * best_time(run, 5 * repeats)
    print(json.dumps({"cache_length": results}), flush=True)
    return results


def main(args) -> int:
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    machine = {"cpus": os.cpu_count(), "threads": threads, "jax": jax.__version__,
               "torch": torch.__version__, "backend": jax.default_backend(),
               "load_average": os.getloadavg()}
    print(json.dumps({"machine": machine}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"machine": machine}
        if "decode" in args.parts:
            for name in LLMS:
                results[f"decode_{name}"] = bench_decode(args, name, Path(tmp))
        if "cache" in args.parts:
            llm = LLMS["small"]
            model = random_model(ValleyConfig(vision=TINY_VISION, llm=llm, temporal_mlp_dim=32,
                                              im_patch_id=llm.vocab_size - 2,
                                              vi_frame_id=llm.vocab_size - 1))
            results["cache_length"] = bench_cache_length(model, args.repeats)
        if "first_token" in args.parts:
            results["first_token"] = bench_first_token(args, Path(tmp))
            print(json.dumps({"first_token": results["first_token"]}), flush=True)
    results["machine"]["load_average_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
