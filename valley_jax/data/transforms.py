"""The steps of the Grain pipeline: record -> example, dropping skipped records, padding a batch.

Top-level classes only: the loader's worker processes are spawned and unpickle these. This module
must stay cheap to import (no jax, no transformers): every worker imports it.

An example (one record, before batching) is a dict of numpy arrays:
  input_ids int32 [L], labels int32 [L] (L <= max_length, unpadded),
  frames uint8 [T, S, S, 3], frame_mask bool [T] (a prefix of True: T for a fixed-mode video, the
  sampled count in fps mode, 1 for an image, 0 for text only).
"""

import json
import logging

import grain
import numpy as np

from valley_jax import tokens
from valley_jax.data import frames as frames_lib
from valley_jax.data.config import DataConfig, DatasetSpec
from valley_jax.data.records import parse_record, record_id, resolve_media_path
from valley_jax.data.skips import REASON_INDEX, SkipRecord, Skipped, empty_counts
from valley_jax.data.text import TextEncoder, format_v1

log = logging.getLogger(__name__)


def _empty_media(config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    size = config.image_size
    return np.zeros((config.num_frames, size, size, 3), np.uint8), np.zeros(config.num_frames, bool)


class JsonRecordToExample(grain.transforms.RandomMap):
    """A Valley/LLaVA JSON record (bytes) -> an example, or a `Skipped` marker.

    A random map: Grain seeds `rng` from the dataset's seed and the element's index, so the
    random crop (`DataConfig.random_crop`, the only use of it) is the same on a resumed run."""

    def __init__(self, config: DataConfig, spec: DatasetSpec, encoder: TextEncoder):
        self._config = config
        self._spec = spec
        self._encoder = encoder
        self._cache = None  # made in the process that maps (a worker), never pickled

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    @property
    def frame_cache(self) -> frames_lib.FrameCache | None:
        """This process's cache of decoded video frames (DataConfig.frame_cache_mb), or None."""
        config = self._config
        if self._cache is None and config.frame_cache_mb > 0 and not config.random_crop:
            self._cache = frames_lib.FrameCache(config.frame_cache_mb << 20)
        return self._cache

    def random_map(self, raw: bytes, rng: np.random.Generator):
        record = json.loads(raw)
        try:
            return self._to_example(parse_record(record), rng)
        except SkipRecord as skip:
            return Skipped(skip.reason, record_id(record), skip.detail)

    def _to_example(self, record, rng: np.random.Generator) -> dict:
        config = self._config
        # Open the media and count its frames first, then tokenise, and only then decode pixels:
        # records that will be skipped for their text cost no decoding.
        video, frame_indices, image_path, cached, cache_key = None, None, None, None, None
        if record.media_kind == "video":
            path = self._media_path(self._spec.video_root, record)
            cache = self.frame_cache
            if cache is not None:
                cache_key = cache.key(path)
                cached = cache.get(cache_key)
            if cached is not None:
                num_media_frames = len(cached)
            else:
                video = frames_lib.VideoFile(path)
                frame_indices = video.frame_indices(config.num_frames, config.frame_mode, config.fps_sample_rate)
                num_media_frames = len(frame_indices)
        elif record.media_kind == "image":
            image_path = self._media_path(self._spec.image_root, record)
            frames_lib.check_media_file(image_path)
            num_media_frames = 1
        else:
            num_media_frames = 0

        media_text = self._encoder.media_text(num_media_frames) if num_media_frames else None
        prompt = format_v1(record.conversations, media_text)
        input_ids, labels = self._encoder.encode(prompt, num_media_frames)

        frames, frame_mask = _empty_media(config)
        if cached is not None:
            frames[:num_media_frames] = cached
        elif video is not None:
            frames[:num_media_frames] = frames_lib.load_video_frames(video, frame_indices, config, rng)
            if self.frame_cache is not None:
                self.frame_cache.put(cache_key, frames[:num_media_frames])
        elif image_path is not None:
            frames[0] = frames_lib.load_image(image_path, config)
        frame_mask[:num_media_frames] = True
        return dict(input_ids=input_ids, labels=labels, frames=frames, frame_mask=frame_mask)

    def _media_path(self, root: str, record) -> str:
        if not root:
            # A configuration error, not a bad record: stop rather than skip every media record.
            raise ValueError(f"{self._spec.path} has {record.media_kind} records but no {record.media_kind}_root")
        return resolve_media_path(root, record.media_path)


class PreparedRecordToExample(grain.transforms.Map):
    """A record of the ArrayRecord files written by `prepare` -> an example, or a `Skipped` marker.

    Tokens were made at prepare time; only the stored frames are decoded here.
    """

    def __init__(self, config: DataConfig):
        self._config = config

    def map(self, stored: dict):
        input_ids = np.asarray(stored["input_ids"], np.int32)
        if len(input_ids) > self._config.max_length:
            return Skipped("too_long", "?", f"prepared with {len(input_ids)} tokens")
        frames, frame_mask = _empty_media(self._config)
        for i, data in enumerate(stored["frames"]):
            frames[i] = frames_lib.decode_frame(data)
        frame_mask[: len(stored["frames"])] = True
        return dict(
            input_ids=input_ids, labels=np.asarray(stored["labels"], np.int32), frames=frames, frame_mask=frame_mask
        )


class ExampleToStored(grain.transforms.Map):
    """An example -> the record `prepare` writes: tokens as they are, the real frames as images."""

    def __init__(self, frame_format: str, jpeg_quality: int):
        self._frame_format = frame_format
        self._jpeg_quality = jpeg_quality

    def map(self, example):
        if isinstance(example, Skipped):
            return example
        num_media_frames = int(example["frame_mask"].sum())
        # Lists rather than arrays: grain would pass arrays from the workers through shared memory,
        # which for these few kilobytes costs more than pickling and can outlive the run.
        return dict(
            input_ids=example["input_ids"].tolist(),
            labels=example["labels"].tolist(),
            frames=[
                frames_lib.encode_frame(frame, self._frame_format, self._jpeg_quality)
                for frame in example["frames"][:num_media_frames]
            ],
        )


class DropSkippedIterDataset(grain.IterDataset):
    """Drops `Skipped` markers before batching, so every batch is full.

    The skips met on the way to an example ride along in its "skip_counts" (int64 [num reasons]);
    the batch sums them and the loader takes them out, so the counts cross the worker processes with
    the data and are restored with the iterator state.
    """

    def __init__(self, parent: grain.IterDataset, max_consecutive_skips: int = 10_000):
        super().__init__(parent)
        self._max_consecutive_skips = max_consecutive_skips

    def __iter__(self):
        return _DropSkippedIterator(self._parent.__iter__(), self._max_consecutive_skips)


class _DropSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive_skips: int):
        super().__init__(parent)
        self._max_consecutive_skips = max_consecutive_skips

    def __next__(self) -> dict:
        counts = empty_counts()
        while True:
            element = next(self._parent)
            if not isinstance(element, Skipped):
                return {**element, "skip_counts": counts}
            counts[REASON_INDEX[element.reason]] += 1
            log.warning("skipped record %s: %s %s", element.record_id, element.reason, element.detail)
            if counts.sum() >= self._max_consecutive_skips:
                raise RuntimeError(f"{counts.sum()} records in a row were skipped; is the data or its root wrong?")

    # Nothing is buffered between examples: the parent's position is the whole state.
    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class PadBatch:
    """grain batch_fn: stacks examples, padding tokens to the smallest bucket that holds the longest."""

    def __init__(self, pad_id: int, buckets: tuple[int, ...]):
        self._pad_id = pad_id
        self._buckets = buckets

    def __call__(self, examples: list[dict]) -> dict:
        longest = max(len(example["input_ids"]) for example in examples)
        length = next(bucket for bucket in self._buckets if bucket >= longest)
        batch_size = len(examples)
        input_ids = np.full((batch_size, length), self._pad_id, np.int32)
        labels = np.full((batch_size, length), tokens.IGNORE_INDEX, np.int32)
        attention_mask = np.zeros((batch_size, length), np.int32)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = example["input_ids"]
            labels[row, :n] = example["labels"]
            attention_mask[row, :n] = 1
        return dict(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            frames=np.stack([example["frames"] for example in examples]),
            frame_mask=np.stack([example["frame_mask"] for example in examples]),
            skip_counts=np.sum([example["skip_counts"] for example in examples], axis=0),
        )
