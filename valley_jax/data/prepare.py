"""Fast path: a Valley/LLaVA JSON dataset -> ArrayRecord files (tensorflow-datasets, without TensorFlow).

    python -m valley_jax.data.prepare --data train.json --video_root /videos --image_root /images \\
        --tokenizer /models/llama-7b --out /data/valley_prepared [--num_frames 8 --max_length 2048 ...]

Each written record holds what the costly part of the JSON path makes: the sampled frames after
resize and crop, each as an image file (JPEG by default; PNG is lossless), and the token ids and
labels (int32 Tensor features; tfds' Image/Video features need TensorFlow). Records are written in
the JSON file's order, without the skipped ones. The run ends by printing and writing `stats.json`
in the output folder: records read, written, skipped by reason, and the settings the tokens and
frames were made with, which a training run reading the folder must share (checked on open).

Training reads the folder with `tfds.data_source` through the same Grain pipeline: give its path
as a `DatasetSpec.path`.
"""

import argparse
import dataclasses
import json
import logging
import os
import tempfile

import grain
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import flags

from valley_jax.data.config import DataConfig, DatasetSpec
from valley_jax.data.records import read_records
from valley_jax.data.skips import REASON_INDEX, SKIP_REASONS, Skipped, empty_counts
from valley_jax.data.text import SpecialTokenIds, TextEncoder, load_tokenizer
from valley_jax.data.transforms import ExampleToStored, JsonRecordToExample

log = logging.getLogger(__name__)

DATASET_NAME = "valley_records"
STATS_FILE = "stats.json"
# Settings baked into the stored frames and tokens: a reader's DataConfig must agree on these.
BAKED_SETTINGS = ("num_frames", "image_size", "num_patches")


class ValleyRecords(tfds.core.GeneratorBasedBuilder):
    """tfds builder over records made elsewhere (by the Grain pipeline in `prepare`)."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for download checksums beside a builder's source, through `importlib_resources`
    # (not installed, and not a tfds dependency). Nothing is downloaded here: no source path.
    code_path = None

    def __init__(self, *, records=(), **kwargs):
        self._records = records
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Valley training records: frames after resize and crop, token ids and labels.",
            features=tfds.features.FeaturesDict(
                {
                    "input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
                }
            ),
            # Keep the JSON order: the loader shuffles, and the JSON and ArrayRecord paths then agree.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield from enumerate(self._records)


def prepare(config: DataConfig, out_dir: str, frame_format: str = "jpeg", jpeg_quality: int = 95) -> dict:
    """Writes config.datasets[0] (a JSON file) as ArrayRecord under out_dir; returns the stats."""
    if len(config.datasets) != 1 or is_prepared(config.datasets[0].path):
        raise ValueError("prepare takes exactly one JSON dataset")
    if config.random_crop:
        raise ValueError("prepare stores the centre crop; random_crop is a training-time option")
    spec = config.datasets[0]
    if os.path.exists(os.path.join(out_dir, DATASET_NAME)):
        # tfds would silently keep the old files and never run the generator below.
        raise FileExistsError(f"{out_dir} already holds a prepared dataset")
    records = read_records(spec.path)
    tokenizer = load_tokenizer(config.tokenizer_path)
    encoder = TextEncoder(tokenizer, config.max_length, config.num_patches)

    # The same record -> example step as training, in worker processes; mp_prefetch returns the
    # workers' outputs round-robin, which is the source order.
    stream = (
        grain.MapDataset.source(records)
        .random_map(JsonRecordToExample(config, spec, encoder), seed=0)  # the rng goes unused
        .map(ExampleToStored(frame_format, jpeg_quality))
        .to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=4))
    )
    if config.num_workers > 0:
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))

    skipped = empty_counts()

    def stored_records():
        iterator = iter(stream)
        try:
            for element in tqdm.tqdm(iterator, total=len(records), desc="records", unit="rec"):
                if isinstance(element, Skipped):
                    skipped[REASON_INDEX[element.reason]] += 1
                    log.warning("skipped record %s: %s %s", element.record_id, element.reason, element.detail)
                    continue
                yield element
        finally:
            if hasattr(iterator, "close"):
                iterator.close()

    os.makedirs(out_dir, exist_ok=True)
    builder = ValleyRecords(records=stored_records(), data_dir=out_dir, file_format="array_record")
    with tempfile.TemporaryDirectory() as download_dir:
        builder.download_and_prepare(download_dir=download_dir)

    ids = encoder.ids
    stats = {
        "source": os.path.abspath(spec.path),
        "records_read": len(records),
        "records_written": len(records) - int(skipped.sum()),
        "records_skipped": int(skipped.sum()),
        "skipped_by_reason": {reason: int(skipped[REASON_INDEX[reason]]) for reason in SKIP_REASONS},
        "settings": {
            **{name: getattr(config, name) for name in BAKED_SETTINGS},
            "frame_mode": config.frame_mode,
            "fps_sample_rate": config.fps_sample_rate,
            "resize_size": config.resize_size,
            "resize_interpolation": config.resize_interpolation,
            "max_length": config.max_length,
            "frame_format": frame_format,
            "jpeg_quality": jpeg_quality if frame_format == "jpeg" else None,
            "tokenizer_path": os.path.abspath(config.tokenizer_path),
            "special_token_ids": dataclasses.asdict(ids),
        },
    }
    with open(os.path.join(out_dir, STATS_FILE), "w") as f:
        json.dump(stats, f, indent=2)
    return stats


def is_prepared(path: str) -> bool:
    return os.path.isdir(path)


def open_prepared(folder: str, config: DataConfig, token_ids: SpecialTokenIds):
    """The tfds data source of a prepared folder, after checking it was made with compatible settings."""
    with open(os.path.join(folder, STATS_FILE)) as f:
        settings = json.load(f)["settings"]
    for name in BAKED_SETTINGS:
        if settings[name] != getattr(config, name):
            raise ValueError(f"{folder} was prepared with {name}={settings[name]}, the config says {getattr(config, name)}")
    if settings["special_token_ids"] != dataclasses.asdict(token_ids):
        raise ValueError(f"{folder} was prepared with another tokenizer: {settings['special_token_ids']}")
    return tfds.data_source(DATASET_NAME, data_dir=folder, split="train")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="Valley/LLaVA .json or .jsonl file")
    parser.add_argument("--video_root", default="")
    parser.add_argument("--image_root", default="")
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer folder")
    parser.add_argument("--out", required=True, help="output folder")
    defaults = DataConfig(datasets=(DatasetSpec(""),), tokenizer_path="")
    parser.add_argument("--num_frames", type=int, default=defaults.num_frames)
    parser.add_argument("--frame_mode", choices=("fixed", "fps"), default=defaults.frame_mode)
    parser.add_argument("--fps_sample_rate", type=float, default=defaults.fps_sample_rate)
    parser.add_argument("--resize_interpolation", choices=("bilinear", "nearest"), default=defaults.resize_interpolation)
    parser.add_argument("--max_length", type=int, default=defaults.max_length)
    parser.add_argument("--num_patches", type=int, default=defaults.num_patches)
    parser.add_argument("--frame_format", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--jpeg_quality", type=int, default=95)
    parser.add_argument("--workers", type=int, default=defaults.num_workers)
    args = parser.parse_args(argv)
    # Grain's worker processes read absl flags; with argparse here, absl's defaults stand.
    flags.FLAGS.mark_as_parsed()

    config = DataConfig(
        datasets=(DatasetSpec(args.data, video_root=args.video_root, image_root=args.image_root),),
        tokenizer_path=args.tokenizer,
        num_frames=args.num_frames,
        frame_mode=args.frame_mode,
        fps_sample_rate=args.fps_sample_rate,
        resize_interpolation=args.resize_interpolation,
        max_length=args.max_length,
        num_patches=args.num_patches,
        num_workers=args.workers,
    )
    stats = prepare(config, args.out, args.frame_format, args.jpeg_quality)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
