"""The input pipeline: datasets -> shuffled, mixed, transformed, batched in worker processes -> mesh.

Per dataset: `grain.MapDataset.source` -> shuffle(seed) -> repeat -> map (record -> example); then
the datasets are mixed by weight, this process takes every process_count-th example of the mixed
stream, and `to_iter_dataset` -> drop skipped records -> batch (padded) -> `mp_prefetch` (worker
processes). Everything is deterministic in the
seed, the process count and the worker count, so an iterator state restores the exact stream.

The batch a `Loader` yields (numpy, one dict per host batch; B = batch_size / process_count,
S = max_length or the smallest length bucket that fits the batch):
  input_ids      int32 [B, S]   pad id after the sequence
  labels         int32 [B, S]   aligned with input_ids (the loss shifts), IGNORE_INDEX where not learned
  attention_mask int32 [B, S]   1 real token, 0 padding
  frames         uint8 [B, T, image_size, image_size, 3]  RGB, not normalised
  frame_mask     bool  [B, T]   video: its sampled frames; image: frame 0; text only: none
"""

import grain
import jax
import numpy as np

from valley_jax.data import prepare
from valley_jax.data.config import DataConfig, DatasetSpec
from valley_jax.data.records import read_records
from valley_jax.data.skips import REASON_INDEX, counts_to_dict, empty_counts
from valley_jax.data.text import SpecialTokenIds, TextEncoder, load_tokenizer
from valley_jax.data.transforms import DropSkippedIterDataset, JsonRecordToExample, PadBatch, PreparedRecordToExample


def _example_dataset(spec: DatasetSpec, index: int, config: DataConfig, encoder: TextEncoder) -> grain.MapDataset:
    prepared = prepare.is_prepared(spec.path)
    if prepared:
        if config.random_crop:
            raise ValueError(f"{spec.path}: a prepared dataset stores its frames already cropped; "
                             "random_crop needs the JSON records and their media files")
        source = prepare.open_prepared(spec.path, config, encoder.ids)
    else:
        source = read_records(spec.path)
    dataset = grain.MapDataset.source(source)
    if len(dataset) == 0:
        raise ValueError(f"{spec.path}: no records")
    if config.shuffle:
        # Shuffle before repeat: every epoch is shuffled anew, and epochs do not blend.
        dataset = dataset.shuffle(seed=config.seed + index)
    dataset = dataset.repeat(config.num_epochs)
    if prepared:
        return dataset.map(PreparedRecordToExample(config))
    # Seeded per element index (after repeat: each epoch draws anew), so a resumed run repeats it.
    return dataset.random_map(JsonRecordToExample(config, spec, encoder), seed=config.seed + index)


class Loader:
    """Batches of the data contract for this jax process, with a saveable position.

    Skipped records are dropped before batching (the next records fill the batch) and counted by
    reason in `skip_counts`, cumulative over the run, restored with the state; a skip is counted
    with the next example delivered, so in a finite stream (num_epochs set) skips after the last
    example go uncounted. Close the loader (or use it as a context manager) to stop the workers.
    """

    def __init__(self, config: DataConfig, process_index: int | None = None, process_count: int | None = None):
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if config.batch_size % process_count:
            raise ValueError(f"batch_size {config.batch_size} does not split over {process_count} processes")
        self.config = config
        tokenizer = load_tokenizer(config.tokenizer_path)
        encoder = TextEncoder(tokenizer, config.max_length, config.num_patches)
        self.special_token_ids: SpecialTokenIds = encoder.ids

        datasets = [_example_dataset(spec, i, config, encoder) for i, spec in enumerate(config.datasets)]
        if len(datasets) == 1:
            examples = datasets[0]
        else:
            examples = grain.MapDataset.mix(datasets, [spec.weight for spec in config.datasets])
        # Shard the one global stream (shuffled and mixed above; maps are lazy, so a process
        # transforms only its own records): the records of a global batch do not depend on
        # the number of processes, and a run can resume on another topology.
        examples = examples[process_index::process_count]
        if len(examples) == 0:
            raise ValueError(f"no records for process {process_index} of {process_count}")

        host_batch_size = config.batch_size // process_count
        stream = examples.to_iter_dataset(
            grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=host_batch_size)
        )
        stream = DropSkippedIterDataset(stream)
        stream = stream.batch(host_batch_size, drop_remainder=True, batch_fn=PadBatch(encoder.ids.pad, config.buckets))
        if config.num_workers > 0:
            stream = stream.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
                )
            )
        self._iterator = iter(stream)
        self._skip_counts = empty_counts()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._skip_counts += batch.pop("skip_counts")
        # Worker batches arrive in shared memory, freed when their last reference goes. Copy
        # them out (a few MB) so that it goes now, not at exit, where Python's resource tracker
        # would report the segments of the last batches held as leaked.
        return {k: np.array(v) if type(v) is not np.ndarray and isinstance(v, np.ndarray) else v
                for k, v in batch.items()}

    @property
    def skip_counts(self) -> dict[str, int]:
        """Records skipped so far, by reason (only reasons that occurred)."""
        return counts_to_dict(self._skip_counts)

    def get_state(self) -> dict:
        """The position in the stream (JSON-serialisable); restore it with `set_state`."""
        return {"grain": self._iterator.get_state(), "skip_counts": self.skip_counts}

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["grain"])
        self._skip_counts = empty_counts()
        for reason, count in state["skip_counts"].items():
            self._skip_counts[REASON_INDEX[reason]] = count

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, data_axes: jax.sharding.PartitionSpec) -> dict:
    """This process's batch -> global jax.Arrays laid out by `data_axes` (e.g. P("data")) on `mesh`.

    Every process passes its own host batch; the global batch axis is their concatenation.
    """
    sharding = jax.sharding.NamedSharding(mesh, data_axes)
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in batch.items()}
