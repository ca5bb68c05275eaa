"""Reading JSON datasets, media paths under their roots, and every kind of bad input.

Malformed JSON stops the loader before training with the file and line; every other bad record is
a counted, logged skip in the stream while batches stay full.
"""

import json
import logging
import os

import numpy as np
import pytest

from test_data_fixtures import (  # noqa: F401 (tokenizer_dir is a fixture)
    MAX_LENGTH,
    conversation,
    data_config,
    make_image,
    make_video,
    tokenizer_dir,
    write_json,
)
from valley_jax.data.config import DatasetSpec
from valley_jax.data.pipeline import Loader
from valley_jax.data.records import parse_record, read_records, resolve_media_path
from valley_jax.data.skips import SkipRecord


def test_malformed_json_names_file_and_line(tmp_path, tokenizer_dir):  # noqa: F811
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]\n')
    with pytest.raises(ValueError, match=f"{path}:3: malformed JSON"):
        Loader(data_config(tokenizer_dir, [DatasetSpec(str(path))]), 0, 1)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"id": "a", "conversations": []}\n{"id": "b"\n\n{"id": "c"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: malformed JSON line"):
        read_records(str(path))


def test_json_that_is_not_a_list_is_refused(tmp_path):
    path = tmp_path / "object.json"
    path.write_text('{"id": "a"}')
    with pytest.raises(ValueError, match=f"{path}:1: expected a JSON list"):
        read_records(str(path))


def test_json_and_jsonl_hold_the_same_records(tmp_path):
    records = [{"id": str(i), "conversations": conversation(f"q{i}", f"a{i}")} for i in range(3)]
    write_json(str(tmp_path / "d.json"), records)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_records(str(tmp_path / "d.json")) == read_records(str(tmp_path / "d.jsonl"))
    assert parse_record(json.loads(read_records(str(tmp_path / "d.jsonl"))[2])).conversations == (("human", "q2"), ("gpt", "a2"))


def test_media_paths_resolve_under_their_root(tmp_path):
    root = str(tmp_path / "root")
    assert resolve_media_path(root, "a/b.mp4") == os.path.join(root, "a", "b.mp4")
    assert resolve_media_path(root, "a/../b.mp4") == os.path.join(root, "b.mp4")
    for escaping in ("../b.mp4", "a/../../b.mp4", "/etc/passwd", "../root2/x.mp4"):
        with pytest.raises(SkipRecord) as skip:
            resolve_media_path(root, escaping)
        assert skip.value.reason == "path_escapes_root"


def test_record_fields_source_folder_and_default_extension():
    record = parse_record({"id": 7, "video": "123", "source": "webvid", "conversations": conversation("q", "a", "<video>")})
    assert (record.id, record.media_kind, record.media_path) == ("7", "video", os.path.join("webvid", "123.mp4"))


def good_records(root, count=4):
    """Text-only and one video record that load fine."""
    make_video(os.path.join(root, "videos", "good.mp4"), 5)
    records = [{"id": "good_video", "video": "good.mp4", "conversations": conversation("What?", "A square.", "<video>")}]
    records += [{"id": f"text{i}", "conversations": conversation(f"Say {i}.", f"{i}.")} for i in range(count - 1)]
    return records


def bad_record(kind: str, root: str) -> dict:
    """One record of each kind of bad input, with what it needs on disk."""
    videos, images = os.path.join(root, "videos"), os.path.join(root, "images")
    os.makedirs(videos, exist_ok=True)
    ask = conversation("What is it?", "Something.", "<video>")
    if kind == "missing_file":
        return {"id": kind, "video": "absent.mp4", "conversations": ask}
    if kind == "empty_file":
        open(os.path.join(videos, "empty.mp4"), "wb").close()
        return {"id": kind, "video": "empty.mp4", "conversations": ask}
    if kind == "corrupt_media":
        good = open(make_video(os.path.join(root, "tmp.mp4"), 5), "rb").read()
        noise = np.random.default_rng(0).integers(0, 256, len(good), dtype=np.uint8).tobytes()
        with open(os.path.join(videos, "corrupt.mp4"), "wb") as f:
            f.write(good[:16] + noise[16:])  # an mp4 header, then garbage
        return {"id": kind, "video": "corrupt.mp4", "conversations": ask}
    if kind == "media_too_small":
        make_image(os.path.join(images, "dot.png"), 1, 1)
        return {"id": kind, "image": "dot.png", "conversations": conversation("What?", "A dot.", "<image>")}
    if kind == "no_conversations":
        return {"id": kind, "video": "good.mp4"}
    if kind == "placeholder_without_media":
        return {"id": kind, "conversations": ask}
    if kind == "multiple_placeholders":
        return {"id": kind, "video": "good.mp4", "conversations": conversation("<video> and <video>?", "Twice.", "<video>")}
    if kind == "too_long":
        return {"id": kind, "conversations": conversation("Tell a story.", "and then " * MAX_LENGTH)}
    if kind == "path_escapes_root":
        make_video(os.path.join(root, "outside.mp4"), 5)  # it exists, but outside the video root
        return {"id": kind, "video": "../outside.mp4", "conversations": ask}
    raise ValueError(kind)


BAD_INPUTS = [
    "missing_file",
    "empty_file",
    "corrupt_media",
    "media_too_small",
    "no_conversations",
    "placeholder_without_media",
    "multiple_placeholders",
    "too_long",
    "path_escapes_root",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_a_counted_logged_skip_and_batches_stay_full(tmp_path, tokenizer_dir, caplog, kind):  # noqa: F811
    root = str(tmp_path)
    # The bad record first, in file order: its skip is counted with the first example.
    records = [bad_record(kind, root)] + good_records(root)
    spec = DatasetSpec(write_json(str(tmp_path / "d.json"), records), os.path.join(root, "videos"), os.path.join(root, "images"))
    config = data_config(tokenizer_dir, [spec], batch_size=2, num_epochs=1, shuffle=False)

    with caplog.at_level(logging.WARNING), Loader(config, 0, 1) as loader:
        batches = list(loader)
        assert loader.skip_counts == {kind: 1}
    assert len(batches) == 2
    for batch in batches:
        assert batch["attention_mask"].sum(axis=1).min() > 0  # every row is a real record
    assert batches[0]["frame_mask"][0].all()  # the good video took the bad record's place
    assert any(f"skipped record {kind}: {kind}" in message for message in caplog.messages)


def test_skips_are_counted_across_worker_processes(tmp_path, tokenizer_dir):  # noqa: F811
    """Worker 0 reads records 0, 2, 4, 6 and worker 1 records 1, 3, 5: each meets one bad record
    first, and both counts reach the loader in the main process."""
    root = str(tmp_path)
    records = [bad_record("missing_file", root), bad_record("too_long", root)] + good_records(root, 5)
    spec = DatasetSpec(write_json(str(tmp_path / "d.json"), records), os.path.join(root, "videos"))
    config = data_config(tokenizer_dir, [spec], batch_size=1, num_epochs=1, shuffle=False, num_workers=2)
    with Loader(config, 0, 1) as loader:
        assert len(list(loader)) == 5
        assert loader.skip_counts == {"missing_file": 1, "too_long": 1}


def test_media_records_without_a_configured_root_stop_the_run(tmp_path, tokenizer_dir):  # noqa: F811
    records = good_records(str(tmp_path))
    spec = DatasetSpec(write_json(str(tmp_path / "d.json"), records))  # no video_root
    with Loader(data_config(tokenizer_dir, [spec], num_epochs=1, shuffle=False), 0, 1) as loader:
        with pytest.raises(ValueError, match="has video records but no video_root"):
            next(loader)
