"""The Grain pipeline: the batch contract, buckets, mixing, sharding, resume, placement on a mesh."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from test_data_fixtures import (  # noqa: F401 (tokenizer_dir is a fixture)
    NUM_FRAMES,
    NUM_PATCHES,
    conversation,
    data_config,
    make_mixed_dataset,
    make_video,
    tokenizer_dir,
    write_json,
)
from valley_jax import tokens
from valley_jax.data.config import DataConfig, DatasetSpec
from valley_jax.data import frames as frames_lib
from valley_jax.data import transforms
from valley_jax.data.pipeline import Loader, to_global
from valley_jax.data.records import read_records
from valley_jax.data.text import TextEncoder, load_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT = {
    "input_ids": np.int32,
    "labels": np.int32,
    "attention_mask": np.int32,
    "frames": np.uint8,
    "frame_mask": np.bool_,
}


@pytest.fixture(scope="module")
def mixed_spec(tmp_path_factory) -> DatasetSpec:
    return make_mixed_dataset(str(tmp_path_factory.mktemp("mixed")))


def take_all(config: DataConfig) -> list[dict]:
    with Loader(config, 0, 1) as loader:
        return list(loader)


def real_rows(batches) -> list[tuple]:
    """Each delivered record as the tuple of its unpadded token ids."""
    return [tuple(ids[mask == 1]) for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]


def test_batches_follow_the_contract(mixed_spec, tokenizer_dir):  # noqa: F811
    with Loader(data_config(tokenizer_dir, [mixed_spec], batch_size=4, num_epochs=1), 0, 1) as loader:
        batches = list(loader)
        ids = loader.special_token_ids
        assert loader.skip_counts == {}
    assert len(batches) == 3  # 12 records
    kinds = []
    for batch in batches:
        assert {name: value.dtype for name, value in batch.items()} == CONTRACT
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 384)
        assert batch["frames"].shape == (4, NUM_FRAMES, 224, 224, 3) and batch["frame_mask"].shape == (4, NUM_FRAMES)
        for row in range(4):
            mask = batch["attention_mask"][row]
            length = int(mask.sum())
            assert mask[:length].all() and not mask[length:].any()
            assert (batch["input_ids"][row, length:] == ids.pad).all()
            assert (batch["labels"][row, length:] == tokens.IGNORE_INDEX).all()
            assert batch["input_ids"][row, 0] == ids.bos
            frame_mask = batch["frame_mask"][row]
            n = int(frame_mask.sum())
            assert frame_mask[:n].all()
            assert not batch["frames"][row, n:].any()
            assert all(frame.max() > 0 for frame in batch["frames"][row, :n])
            row_ids = batch["input_ids"][row]
            assert (row_ids == ids.vi_frame).sum() == n
            assert (row_ids == ids.im_patch).sum() == (NUM_PATCHES if n else 0)
            kinds.append(n)
    # 6 videos (all T frames), 3 images (frame 0), 3 text-only (none).
    assert sorted(kinds) == [0] * 3 + [1] * 3 + [NUM_FRAMES] * 6


def test_fps_mode_marks_the_frames_it_sampled(mixed_spec, tokenizer_dir):  # noqa: F811
    """The test videos run 3 to 13 frames at 10 fps: one frame every 20, so frame 0 alone."""
    config = data_config(tokenizer_dir, [mixed_spec], batch_size=4, num_epochs=1, frame_mode="fps")
    with Loader(config, 0, 1) as loader:
        batches = list(loader)
        vi_frame = loader.special_token_ids.vi_frame
    frames_per_row = np.concatenate([b["frame_mask"].sum(axis=1) for b in batches])
    frame_tokens = np.concatenate([(b["input_ids"] == vi_frame).sum(axis=1) for b in batches])
    np.testing.assert_array_equal(frames_per_row, frame_tokens)
    assert sorted(frames_per_row) == [0] * 3 + [1] * 9  # 3 text-only, 3 images, 6 one-frame videos


def test_length_buckets_pad_to_the_smallest_that_fits(mixed_spec, tokenizer_dir):  # noqa: F811
    config = data_config(tokenizer_dir, [mixed_spec], batch_size=2, num_epochs=1, length_buckets=(64, 100, 128))
    for batch in take_all(config):
        longest = batch["attention_mask"].sum(axis=1).max()
        assert batch["input_ids"].shape[1] == min(b for b in (64, 100, 128, 384) if b >= longest)


def test_one_epoch_delivers_every_record_once_and_the_seed_decides_the_order(mixed_spec, tokenizer_dir):  # noqa: F811
    config = data_config(tokenizer_dir, [mixed_spec], batch_size=1, num_epochs=1, seed=1)
    first = real_rows(take_all(config))
    assert len(first) == len(set(first)) == 12
    assert real_rows(take_all(config)) == first
    other_seed = real_rows(take_all(dataclasses.replace(config, seed=2)))
    assert sorted(other_seed) == sorted(first) and other_seed != first


def test_random_crop_moves_only_video_frames_and_repeats_with_the_seed(mixed_spec, tokenizer_dir):  # noqa: F811
    centre = data_config(tokenizer_dir, [mixed_spec], batch_size=1, num_epochs=2, seed=1)
    random = dataclasses.replace(centre, random_crop=True)
    a, b, c = take_all(centre), take_all(random), take_all(random)
    assert real_rows(a) == real_rows(b)  # the same records in the same order
    for x, y in zip(b, c):
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])
    moved, by_record = 0, {}
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["frame_mask"], y["frame_mask"])
        if x["frame_mask"].sum() > 1:  # a video (fixed mode: NUM_FRAMES frames)
            moved += not np.array_equal(x["frames"], y["frames"])
            by_record.setdefault(tuple(x["input_ids"][0]), []).append(y["frames"])
        else:  # an image (the CLIP processor's crop) or text only
            np.testing.assert_array_equal(x["frames"], y["frames"])
    assert len(by_record) == 6 and moved >= 10  # 12 video examples; a draw may land centred
    # Each epoch draws its own crop.
    assert sum(not np.array_equal(*crops) for crops in by_record.values()) >= 5


def test_frame_cache_delivers_the_same_batches(mixed_spec, tokenizer_dir):  # noqa: F811
    plain = data_config(tokenizer_dir, [mixed_spec], batch_size=3, num_epochs=3, num_workers=2)
    cached = dataclasses.replace(plain, frame_cache_mb=16)
    a, b = take_all(plain), take_all(cached)
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])


def test_frame_cache_decodes_a_video_once_and_a_replaced_one_again(tmp_path, tokenizer_dir, monkeypatch):  # noqa: F811
    spec = make_mixed_dataset(str(tmp_path))
    config = data_config(tokenizer_dir, [spec], frame_cache_mb=16)
    encoder = TextEncoder(load_tokenizer(tokenizer_dir), config.max_length, config.num_patches)
    source = read_records(spec.path)
    opened = []
    real_video_file = frames_lib.VideoFile

    def counting_video_file(path):
        opened.append(os.path.basename(path))
        return real_video_file(path)

    monkeypatch.setattr(frames_lib, "VideoFile", counting_video_file)
    to_example = transforms.JsonRecordToExample(config, spec, encoder)
    uncached = transforms.JsonRecordToExample(dataclasses.replace(config, frame_cache_mb=0), spec, encoder)
    rng = np.random.default_rng(0)

    def frames_of(transform, i):
        return transform.random_map(source[i], rng)["frames"]

    first = [frames_of(to_example, i) for i in range(6)]  # the six videos
    assert len(opened) == 6 and to_example.frame_cache.misses == 6
    again = [frames_of(to_example, i) for i in range(6)]
    assert len(opened) == 6 and to_example.frame_cache.hits == 6
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    # A file replaced during the run (another size or time) is decoded anew.
    make_video(os.path.join(str(tmp_path), "videos", "v1.mp4"), num_frames=2, width=80)
    replaced = frames_of(to_example, 1)
    assert opened[6:] == ["v1.mp4"]
    assert not np.array_equal(replaced, first[1])
    np.testing.assert_array_equal(replaced, frames_of(uncached, 1))
    # Pickled into a worker, a transform starts with an empty cache of its own.
    copy = pickle.loads(pickle.dumps(to_example))
    assert copy.frame_cache.hits == copy.frame_cache.misses == copy.frame_cache.bytes == 0
    # No cache with random crops, which differ at every epoch.
    assert transforms.JsonRecordToExample(dataclasses.replace(config, random_crop=True), spec,
                                          encoder).frame_cache is None


def test_frame_cache_keeps_the_most_recently_used_within_its_bytes():
    cache = frames_lib.FrameCache(max_bytes=2 * 1000)
    one = np.zeros(1000, np.uint8)
    for key in "abc":
        cache.put(key, one)
        cache.get("a")  # a stays recent
    assert cache.bytes == 2000
    assert cache.get("a") is not None and cache.get("c") is not None and cache.get("b") is None
    cache.put("big", np.zeros(2001, np.uint8))  # larger than the whole cache: not kept
    assert cache.get("big") is None and cache.bytes == 2000
    with pytest.raises(ValueError):
        cache.get("a")[0] = 1  # read-only: a caller cannot change what later epochs get


def test_processes_read_disjoint_shards(mixed_spec, tokenizer_dir):  # noqa: F811
    config = data_config(tokenizer_dir, [mixed_spec], batch_size=2, num_epochs=1)
    shards = []
    for process_index in range(2):
        with Loader(config, process_index, 2) as loader:  # host batch 1
            shards.append(real_rows(loader))
    assert len(shards[0]) == len(shards[1]) == 6
    assert not set(shards[0]) & set(shards[1])


def test_datasets_mix_by_weight(tmp_path, tokenizer_dir):  # noqa: F811
    specs = []
    for name, weight in (("alpha", 3.0), ("beta", 1.0)):
        records = [{"id": f"{name}{i}", "conversations": conversation(f"Which {i}?", name)} for i in range(5)]
        specs.append(DatasetSpec(write_json(str(tmp_path / f"{name}.json"), records), weight=weight))
    config = data_config(tokenizer_dir, specs, batch_size=4, max_length=128)
    with Loader(config, 0, 1) as loader:
        batches = [next(loader) for _ in range(10)]
    tokenizer = load_tokenizer(tokenizer_dir)
    answers = [tokenizer.decode(labels[labels != tokens.IGNORE_INDEX]) for b in batches for labels in b["labels"]]
    # 3 of every 4 of the 40 examples from alpha (its 5 records repeat, reshuffled per epoch).
    assert (answers.count("alpha\n###"), answers.count("beta\n###")) == (30, 10)


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from absl import flags
    from valley_jax.data.config import DataConfig, DatasetSpec
    from valley_jax.data.pipeline import Loader

    def main():
        flags.FLAGS.mark_as_parsed()
        settings = json.load(open(sys.argv[1]))
        settings["datasets"] = tuple(DatasetSpec(**spec) for spec in settings["datasets"])
        with Loader(DataConfig(**settings), 0, 1) as loader:
            loader.set_state(json.load(open(sys.argv[2])))
            batches = [next(loader) for _ in range(int(sys.argv[3]))]
            counts = loader.skip_counts
        np.savez(sys.argv[4], **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
        json.dump(counts, open(sys.argv[4] + ".skips.json", "w"))

    if __name__ == "__main__":
        main()
    """
)


def test_resumed_in_a_new_process_the_stream_continues_exactly(mixed_spec, tokenizer_dir, tmp_path):  # noqa: F811
    records = json.load(open(mixed_spec.path))
    records.insert(2, {"id": "lost", "video": "lost.mp4", "conversations": conversation("?", "!", "<video>")})
    spec = dataclasses.replace(mixed_spec, path=write_json(str(tmp_path / "with_bad.json"), records))
    config = data_config(tokenizer_dir, [spec], batch_size=2, num_workers=2, seed=5, random_crop=True)
    done, following = 3, 5

    with Loader(config, 0, 1) as loader:
        for _ in range(done):
            next(loader)
        state = loader.get_state()
        expected = [next(loader) for _ in range(following)]  # 8 batches: past the first epoch's end
        expected_skips = loader.skip_counts
    assert expected_skips == {"missing_file": 2}

    paths = {name: str(tmp_path / name) for name in ("config.json", "state.json", "script.py", "resumed.npz")}
    json.dump(dataclasses.asdict(config), open(paths["config.json"], "w"))
    json.dump(state, open(paths["state.json"], "w"))  # the state must survive JSON
    open(paths["script.py"], "w").write(RESUME_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(
        [sys.executable, paths["script.py"], paths["config.json"], paths["state.json"], str(following), paths["resumed.npz"]],
        env=env, timeout=120, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Batches leave shared memory as they arrive: none is reported leaked at exit.
    assert "leaked shared_memory" not in run.stderr
    assert all(type(value) is np.ndarray for batch in expected for value in batch.values())
    resumed = np.load(paths["resumed.npz"])
    for i, batch in enumerate(expected):
        for name, value in batch.items():
            np.testing.assert_array_equal(resumed[f"{i}_{name}"], value, err_msg=f"batch {done + i} {name}")
    assert json.load(open(paths["resumed.npz"] + ".skips.json")) == expected_skips


def test_to_global_places_the_host_batch_on_the_mesh():
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("data", "fsdp"))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, 100, (8, 16), dtype=np.int32),
        "frames": rng.integers(0, 256, (8, 2, 4, 4, 3), dtype=np.uint8),
        "frame_mask": rng.integers(0, 2, (8, 2)).astype(bool),
    }
    placed = to_global(batch, mesh, P(("data", "fsdp")))
    for name, value in batch.items():
        assert placed[name].shape == value.shape and placed[name].dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(placed[name]), value)
        assert placed[name].sharding.spec == P(("data", "fsdp"))
        # Eight devices, one row each.
        assert sorted(shard.index[0].start for shard in placed[name].addressable_shards) == list(range(8))
