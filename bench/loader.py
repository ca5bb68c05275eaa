"""Input pipeline speed: videos/s delivered by the Grain loader against decord alone, same run.

    python bench/loader.py [--videos 8] [--frames 150] [--keyint 0] [--batches 6] [--repeats 2] [--workers 2]

Both sides read the same mp4 files (made here: 640x360, 25 fps, H.264 with x264's defaults or a
shorter keyframe interval, textured moving content, about WebVid's size) and the same 8 frames of
each (the spec's linspace).

  decord alone:  one process, `decord.VideoReader(path, num_threads=1).get_batch(indices)` per
                 video, as the reference's `load_video` decodes; nothing else.
  loader:        valley_jax.data.pipeline.Loader with `--workers` worker processes: decode, resize
                 to 256 and crop to 224, template and tokens (256 patches, max length 2048),
                 batches of 8 padded, delivered to this process through shared memory. Timed from
                 the second batch on (the first pays for starting the workers).

The two sides alternate `--repeats` times; medians and each repeat's ratio are printed, and with
`--json` written to a file. CPU seconds per video are measured too (this process and the workers,
from /proc): on a machine shared with other jobs wall-clock rates swing, CPU cost does not, and
`cpu_bound_ratio` = workers x decord's CPU s/video / the loader's is the ratio with free cores.
Decord with its own thread pool (num_threads=0) is printed for reference, not used in the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import av  # noqa: E402
import decord  # noqa: E402
import numpy as np  # noqa: E402

from test_data_fixtures import conversation, make_tokenizer, write_json  # noqa: E402  (marks absl flags parsed)
from valley_jax.data.config import DataConfig, DatasetSpec  # noqa: E402
from valley_jax.data.frames import sample_frame_indices  # noqa: E402
from valley_jax.data.pipeline import Loader  # noqa: E402

NUM_FRAMES = 8
BATCH_SIZE = 8


def make_textured_video(
    path: str, num_frames: int, seed: int, keyint: int | None, width: int = 640, height: int = 360
) -> None:
    """Moving sinusoidal shading over film-grain-like texture: costs a decoder what real footage does,
    unlike flat test frames."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    grain = rng.integers(0, 40, (height + 64, width + 64, 3), dtype=np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if keyint:
            stream.gop_size = keyint
        for i in range(num_frames):
            shade = 110 + 80 * np.sin((x + 3 * i + seed * 17) / 37.0) * np.cos((y - 2 * i) / 23.0)
            noise = grain[i % 64 : i % 64 + height, (2 * i) % 64 : (2 * i) % 64 + width]
            image = (shade[..., None] + noise).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def process_tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live children (the loader's
    workers): unlike wall time, what the work cost, however busy the machine is with others."""
    pids = [os.getpid()]
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids += [int(pid) for pid in f.read().split()]
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def decord_alone(paths: list[str], passes: int, num_threads: int) -> tuple[float, float]:
    """(videos/s, CPU s/video) decoding the sampled frames, one video after another here."""
    start, cpu_start = time.perf_counter(), process_tree_cpu_seconds()
    for _ in range(passes):
        for path in paths:
            reader = decord.VideoReader(path, num_threads=num_threads, ctx=decord.cpu(0))
            indices = sample_frame_indices(len(reader), NUM_FRAMES, "fixed")
            reader.get_batch(list(indices)).asnumpy()
    videos = passes * len(paths)
    return videos / (time.perf_counter() - start), (process_tree_cpu_seconds() - cpu_start) / videos


def loader_throughput(config: DataConfig, num_batches: int) -> tuple[float, float]:
    """(videos/s, CPU s/video of the workers and this process together) delivered by the loader."""
    with Loader(config, 0, 1) as loader:
        next(loader)  # worker start-up
        start, cpu_start = time.perf_counter(), process_tree_cpu_seconds()
        for _ in range(num_batches):
            batch = next(loader)
        elapsed, cpu = time.perf_counter() - start, process_tree_cpu_seconds() - cpu_start
    assert batch["frames"].shape == (BATCH_SIZE, NUM_FRAMES, 224, 224, 3) and batch["frame_mask"].all()
    videos = num_batches * BATCH_SIZE
    return videos / elapsed, cpu / videos


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=8, help="distinct videos (the stream cycles over them)")
    parser.add_argument("--frames", type=int, default=150, help="frames per video")
    parser.add_argument("--batches", type=int, default=6, help="timed loader batches of 8 videos")
    parser.add_argument("--passes", type=int, default=3, help="decord-alone passes over the videos")
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the two sides (medians reported)")
    parser.add_argument("--keyint", type=int, default=0, help="frames between keyframes (0: x264's 250)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "valley_loader_bench"))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    video_dir = os.path.join(args.workdir, "videos")
    os.makedirs(video_dir, exist_ok=True)
    names = [f"v{i}_{args.frames}_k{args.keyint}.mp4" for i in range(args.videos)]
    for i, name in enumerate(names):
        if not os.path.exists(os.path.join(video_dir, name)):  # made once, reused by later runs
            make_textured_video(os.path.join(video_dir, name), args.frames, seed=i, keyint=args.keyint or None)
    records = [
        {"id": name, "video": name, "conversations": conversation("Describe the video in detail.",
                                                                  "A shaded pattern drifts across grainy film.", "<video>")}
        for name in names
    ]
    data = write_json(os.path.join(args.workdir, "bench.json"), records)
    tokenizer = make_tokenizer(os.path.join(args.workdir, "tokenizer"))
    config = DataConfig(
        datasets=(DatasetSpec(data, video_root=video_dir),),
        tokenizer_path=tokenizer,
        num_frames=NUM_FRAMES,
        num_patches=256,
        max_length=2048,
        batch_size=BATCH_SIZE,
        num_workers=args.workers,
    )
    paths = [os.path.join(video_dir, name) for name in names]

    decord_alone(paths[:1], 1, 1)  # warm the page cache and decord's first-use costs
    # Alternate the two sides so that a change in the machine's load hits both alike.
    baselines, pipelines = [], []
    for _ in range(args.repeats):
        baselines.append(decord_alone(paths, args.passes, num_threads=1))
        pipelines.append(loader_throughput(config, args.batches))
    threaded, _ = decord_alone(paths, 1, num_threads=0)
    (baseline, baseline_cpu), (pipeline, pipeline_cpu) = np.median(baselines, axis=0), np.median(pipelines, axis=0)
    cores = min(args.workers, os.cpu_count())
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "decord_alone_videos_per_s": round(baseline, 2),
        "loader_videos_per_s": round(pipeline, 2),
        "ratio": round(pipeline / baseline, 2),
        "ratio_per_repeat": [round(p / b, 2) for (b, _), (p, _) in zip(baselines, pipelines)],
        "decord_alone_cpu_s_per_video": round(baseline_cpu, 4),
        "loader_cpu_s_per_video": round(pipeline_cpu, 4),
        # What the ratio is when the workers have `cores` free cores: CPU cost decides it.
        "cpu_bound_ratio": round(cores * baseline_cpu / pipeline_cpu, 2),
        "decord_own_threads_videos_per_s": round(threaded, 2),
        "workers": args.workers,
        "video": f"640x360, {args.frames} frames at 25 fps, H.264, keyint {args.keyint or 250}",
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
