"""The ArrayRecord fast path: `prepare` writes what the JSON path computes; reading it back through
the same pipeline gives the same batches (frames exactly with PNG; within a stated JPEG tolerance)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from test_data_fixtures import (  # noqa: F401 (tokenizer_dir is a fixture)
    MAX_LENGTH,
    conversation,
    data_config,
    make_mixed_dataset,
    tokenizer_dir,
    write_json,
)
from valley_jax.data import prepare as prepare_lib
from valley_jax.data.config import DatasetSpec
from valley_jax.data.pipeline import Loader

TOKEN_FIELDS = ("input_ids", "labels", "attention_mask", "frame_mask")


@pytest.fixture(scope="module")
def mixed_spec(tmp_path_factory) -> DatasetSpec:
    return make_mixed_dataset(str(tmp_path_factory.mktemp("mixed")))


def batches_of(config) -> list[dict]:
    with Loader(config, 0, 1) as loader:
        return list(loader)


@pytest.mark.parametrize("frame_format", ["png", "jpeg"])
def test_array_record_path_gives_the_json_paths_batches(mixed_spec, tokenizer_dir, tmp_path, frame_format):  # noqa: F811
    config = data_config(tokenizer_dir, [mixed_spec], batch_size=2, num_epochs=1)
    out = str(tmp_path / "prepared")
    stats = prepare_lib.prepare(config, out, frame_format)
    assert (stats["records_read"], stats["records_written"], stats["records_skipped"]) == (12, 12, 0)

    from_json = batches_of(config)
    from_records = batches_of(dataclasses.replace(config, datasets=(DatasetSpec(out),)))
    assert len(from_json) == len(from_records) == 6
    for json_batch, record_batch in zip(from_json, from_records):
        for name in TOKEN_FIELDS:
            np.testing.assert_array_equal(record_batch[name], json_batch[name], err_msg=name)
        difference = np.abs(record_batch["frames"].astype(int) - json_batch["frames"])
        if frame_format == "png":
            assert difference.max() == 0
        else:
            # JPEG at quality 95 (measured here: mean 0.07, max 4 grey levels, at the square's edges).
            assert difference.mean() < 0.25 and difference.max() <= 8


def test_cli_writes_in_json_order_and_counts_skips(tmp_path, tokenizer_dir, capsys):  # noqa: F811
    records = [{"id": f"text{i}", "conversations": conversation(f"Question {i}?", f"Answer {i}.")} for i in range(5)]
    records.insert(1, {"id": "gone", "video": "gone.mp4", "conversations": conversation("?", "!", "<video>")})
    records.insert(4, {"id": "long", "conversations": conversation("Story?", "and then " * MAX_LENGTH)})
    records.insert(5, {"id": "nothing"})
    data = write_json(str(tmp_path / "d.json"), records)
    out = str(tmp_path / "prepared")
    prepare_lib.main([
        "--data", data, "--video_root", str(tmp_path / "videos"), "--tokenizer", tokenizer_dir, "--out", out,
        "--num_frames", "4", "--num_patches", "16", "--max_length", str(MAX_LENGTH), "--workers", "2",
    ])

    stats = json.load(open(os.path.join(out, "stats.json")))
    printed = capsys.readouterr().out  # tfds prints its own lines first
    assert json.loads(printed[printed.rindex('{\n  "source"'):]) == stats
    assert (stats["records_read"], stats["records_written"], stats["records_skipped"]) == (8, 5, 3)
    assert {reason: n for reason, n in stats["skipped_by_reason"].items() if n} == {
        "missing_file": 1, "too_long": 1, "no_conversations": 1}

    # Read back with tfds: the five good records, in the JSON file's order.
    source = tfds.data_source(prepare_lib.DATASET_NAME, data_dir=out, split="train")
    spec = DatasetSpec(data, video_root=str(tmp_path / "videos"))
    config = data_config(tokenizer_dir, [spec], batch_size=1, num_epochs=1, shuffle=False)
    from_json = batches_of(config)
    assert len(source) == len(from_json) == 5
    for stored, batch in zip(source, from_json):
        length = batch["attention_mask"].sum()
        np.testing.assert_array_equal(stored["input_ids"], batch["input_ids"][0, :length])
        np.testing.assert_array_equal(stored["labels"], batch["labels"][0, :length])
        assert len(stored["frames"]) == 0


def test_a_prepared_folder_refuses_other_settings(mixed_spec, tokenizer_dir, tmp_path):  # noqa: F811
    config = data_config(tokenizer_dir, [mixed_spec], batch_size=2, num_epochs=1)
    out = str(tmp_path / "prepared")
    prepare_lib.prepare(config, out, "jpeg")
    with pytest.raises(ValueError, match="num_frames=4, the config says 8"):
        Loader(dataclasses.replace(config, datasets=(DatasetSpec(out),), num_frames=8), 0, 1)
    with pytest.raises(FileExistsError):
        prepare_lib.prepare(config, out, "jpeg")
    # Prepared frames are cropped once, at prepare time: no random crop from them, nor into them.
    with pytest.raises(ValueError, match="random_crop needs the JSON records"):
        Loader(dataclasses.replace(config, datasets=(DatasetSpec(out),), random_crop=True), 0, 1)
    with pytest.raises(ValueError, match="random_crop is a training-time option"):
        prepare_lib.prepare(dataclasses.replace(config, random_crop=True), str(tmp_path / "p2"), "jpeg")
