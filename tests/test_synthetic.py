"""The synthetic video world (valley_jax/data/synthetic.py).

Answers and captions are re-derived from the decoded pixels by a colour-blob tracker written
here, never from the generator's scene descriptions: if the generator drew one thing and wrote
another, these tests fail.
"""

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image
from transformers import AutoTokenizer

from valley_jax import tokens
from valley_jax.data import synthetic

SIZE, FRAMES, NUM_TRAIN, NUM_HELD_OUT = 112, 16, 100, 80
QA_SPLITS = ("stage2", "val", "val_novel")
ALL_SPLITS = ("stage1", *QA_SPLITS)
COLOUR_WORDS = {"red", "green", "blue", "yellow", "purple", "cyan"}
VOCAB = {
    "colour": COLOUR_WORDS,
    "shape": {"square", "circle", "triangle"},
    "count": {"one", "two"},
    "direction": {"left", "right", "up", "down"},
    "move_order": {"before", "after"},
    "appear_first": COLOUR_WORDS,
}
CHANCE = {
    "colour": 1 / 6,
    "shape": 1 / 3,
    "count": 1 / 2,
    "direction": 1 / 4,
    "move_order": 1 / 2,
    "appear_first": 1 / 6,
}
HELD_OUT = {("red", "triangle"), ("green", "circle"), ("blue", "square")}


def _generate(root: Path, seed: int) -> Path:
    synthetic.generate(root, seed=seed, num_train=NUM_TRAIN, size=SIZE, frames=FRAMES)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("seed0"), seed=0)


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("seed0_again"), seed=0)


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory) -> Path:
    """Seed 1, made through the command line."""
    out = tmp_path_factory.mktemp("seed1")
    flags = f"--out {out} --seed 1 --num-train {NUM_TRAIN} --size {SIZE} --frames {FRAMES}"
    command = [sys.executable, "-m", "valley_jax.data.synthetic", *flags.split()]
    subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).parents[1])
    return out


def load(root: Path, name: str) -> list[dict]:
    return json.loads((root / f"{name}.json").read_text())


def media_of(record: dict) -> str:
    return record.get("video") or record["image"]


def qa_turns(record: dict) -> list[tuple[dict, dict]]:
    conversations = record["conversations"]
    return list(zip(conversations[::2], conversations[1::2], strict=True))


def media_files(root: Path) -> set[str]:
    return {
        f"{p.parent.name}/{p.name}"
        for folder in ("videos", "images")
        for p in (root / folder).iterdir()
    }


def decode(root: Path, media: str) -> np.ndarray:
    """[T, H, W, 3] uint8 as the data pipeline reads it (decord for videos)."""
    if media.endswith(".mp4"):
        reader = decord.VideoReader(str(root / media))
        return reader.get_batch(list(range(len(reader)))).asnumpy()
    return np.asarray(Image.open(root / media).convert("RGB"))[None]


# ---------------------------------------------------------------------------------------------
# A colour-blob tracker on decoded pixels.

PALETTE = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 70, 235),
    "yellow": (240, 220, 30),
    "purple": (210, 40, 210),
    "cyan": (30, 210, 220),
}
# RGB distance. Palette colours are >= 140 apart and >= 127 from any background grey; at about
# half-way the mask follows the drawn edge through the codec's blur.
COLOUR_TOLERANCE = 75.0
MIN_PIXELS = 20  # fewer is coding noise, not a shape
MOVED_PIXELS = 2.0  # centroid jitter of a resting shape stays well below this


@dataclass
class Blob:
    colour: str
    shape: str
    first_frame: int  # the first frame it is seen in
    onset: int | None  # the first frame at which it has left the place it was first seen
    direction: str | None  # of its overall displacement


def shape_of(mask: np.ndarray) -> str:
    """By how much of its bounding box it fills: square 1, disc pi/4 ~ 0.79, triangle 1/2."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    fill = mask.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"


def track(frames: np.ndarray) -> dict[str, Blob]:
    pixels, palette = frames.astype(np.int32), np.array(list(PALETTE.values()), np.int32)
    distance2 = sum((pixels[..., k, None] - palette[:, k]) ** 2 for k in range(3))
    masks = distance2 < COLOUR_TOLERANCE**2  # [T, H, W, colours]
    row_profile, col_profile = masks.sum(2), masks.sum(1)  # [T, H, colours], [T, W, colours]
    counts = row_profile.sum(1)  # [T, colours]
    safe = np.maximum(counts, 1)
    centroids = np.stack(  # [T, colours, (row, col)]
        [
            (row_profile * np.arange(frames.shape[1])[:, None]).sum(1) / safe,
            (col_profile * np.arange(frames.shape[2])[:, None]).sum(1) / safe,
        ],
        -1,
    )
    blobs = {}
    for c, colour in enumerate(PALETTE):
        present = np.flatnonzero(counts[:, c] >= MIN_PIXELS)
        if not len(present):
            continue
        first, last = int(present[0]), int(present[-1])
        offsets = np.abs(centroids[present, c] - centroids[first, c]).max(-1)
        moved = present[offsets > MOVED_PIXELS]
        direction = None
        if len(moved):
            d_row, d_col = centroids[last, c] - centroids[first, c]
            if abs(d_col) > abs(d_row):
                direction = "right" if d_col > 0 else "left"
            else:
                direction = "down" if d_row > 0 else "up"
        onset = int(moved[0]) if len(moved) else None
        blobs[colour] = Blob(colour, shape_of(masks[last, :, :, c]), first, onset, direction)
    return blobs


def named(question: str, blobs: dict[str, Blob]) -> list[Blob]:
    """The blobs a question names, by colour or shape word, in the order it names them."""
    found = []
    for word in re.findall(r"[a-z]+", question.lower()):
        found += [blob for blob in blobs.values() if word in (blob.colour, blob.shape)]
    return found


def answer_from_pixels(question: str, qtype: str, blobs: dict[str, Blob]) -> str:
    if qtype == "count":
        return ("one", "two")[len(blobs) - 1]
    if qtype == "appear_first":
        first, second = sorted(blobs.values(), key=lambda blob: blob.first_frame)
        assert first.first_frame < second.first_frame
        return first.colour
    refs = named(question, blobs)
    if qtype == "move_order":
        assert len(refs) == 2 and None not in (refs[0].onset, refs[1].onset)
        assert refs[0].onset != refs[1].onset
        by_colour = refs[0].colour in question.lower()
        first, second = (f"{b.colour} object" if by_colour else b.shape
                         for b in sorted(refs, key=lambda blob: blob.onset))
        return f"The {first} moves first, then the {second}."
    assert len(refs) == 1, question
    return {"colour": refs[0].colour, "shape": refs[0].shape, "direction": refs[0].direction}[qtype]


def video_caption_from_pixels(blobs: dict[str, Blob]) -> str:
    by_onset = sorted(blobs.values(), key=lambda blob: blob.onset)
    return ", then ".join(f"a {b.colour} {b.shape} moves {b.direction}" for b in by_onset)


@pytest.fixture(scope="module")
def tracks(data) -> dict[str, dict[str, Blob]]:
    """Blobs of every media file of the seed-0 set, by its relative path."""
    media = {media_of(record) for name in ALL_SPLITS for record in load(data, name)}
    return {path: track(decode(data, path)) for path in media}


# ---------------------------------------------------------------------------------------------


def test_layout_counts_and_media(data):
    assert {p.name for p in data.iterdir()} == {
        "stage1.json",
        "stage2.json",
        "val.json",
        "val_novel.json",
        "meta.json",
        "tokenizer",
        "videos",
        "images",
    }
    meta = json.loads((data / "meta.json").read_text())
    assert meta["args"] == {
        "version": synthetic.VERSION,
        "seed": 0,
        "num_train": NUM_TRAIN,
        "size": SIZE,
        "frames": FRAMES,
        "qa_rounds": synthetic.QA_ROUNDS,
        "codec": synthetic.video_codec(),
    }
    records = {name: split["records"] for name, split in meta["splits"].items()}
    assert synthetic.QA_ROUNDS == 6
    assert records == {
        "stage1": NUM_TRAIN,
        "stage2": 6 * NUM_TRAIN,
        "val": NUM_HELD_OUT,
        "val_novel": NUM_HELD_OUT,
    }
    # Every train scene has one caption and six QA records, round by round in the scenes'
    # order; held-out scenes one QA record each.
    captions, qa = load(data, "stage1"), load(data, "stage2")
    assert [media_of(r) for r in qa] == 6 * [media_of(r) for r in captions]
    assert [r["id"] for r in qa[NUM_TRAIN + 1::NUM_TRAIN]] == [
        f"train_qa_00001_r{k}" for k in range(1, 6)]
    assert len({r["id"] for r in qa}) == 6 * NUM_TRAIN
    videos, images = list((data / "videos").iterdir()), list((data / "images").iterdir())
    assert len(videos) + len(images) == NUM_TRAIN + 2 * NUM_HELD_OUT
    assert {p.suffix for p in videos} == {".mp4"} and {p.suffix for p in images} == {".png", ".jpg"}
    reader = decord.VideoReader(str(videos[0]))
    assert len(reader) == FRAMES
    assert reader.get_batch([0, FRAMES - 1]).asnumpy().shape == (2, SIZE, SIZE, 3)
    for image in images:
        assert Image.open(image).size == (SIZE, SIZE)


def test_record_format(data):
    for record in load(data, "stage1"):
        placeholder = tokens.VIDEO if "video" in record else tokens.IMAGE
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith(placeholder + "\n")
        assert gpt["from"] == "gpt" and "<" not in gpt["value"]
    for name in QA_SPLITS:
        for record in load(data, name):
            placeholder = tokens.VIDEO if "video" in record else tokens.IMAGE
            turns = qa_turns(record)
            assert 2 <= len(turns) <= 3
            assert all(h["from"] == "human" and g["from"] == "gpt" for h, g in turns)
            assert turns[0][0]["value"].startswith(placeholder + "\n")
            text = "".join(h["value"] + g["value"] for h, g in turns)
            assert text.count(tokens.VIDEO) + text.count(tokens.IMAGE) == 1
            assert record["qtypes"] == [gpt["qtype"] for _, gpt in turns]
            for human, gpt in turns:
                reply, qtype = gpt["value"], gpt["qtype"]
                if qtype == "move_order":  # the two shapes in the order they move
                    assert re.fullmatch(r"The [a-z ]+ moves first, then the [a-z ]+\.", reply)
                else:
                    assert reply in VOCAB[qtype]
                assert synthetic.answer_key(qtype, human["value"], reply) in VOCAB[qtype]


def test_move_order_answer_key():
    """Whether the shape a move-order question asks about moves before or after the other."""
    asked = "Does the circle start moving before or after the square?"
    assert synthetic.answer_key("move_order", asked, "The circle moves first, then the square.") \
        == "before"
    assert synthetic.answer_key("move_order", "<video>\nDoes the red object move before or after "
                                "the circle?", "The circle moves first, then the red object.") \
        == "after"
    assert synthetic.answer_key("shape", "What shape is the red object?", "circle") == "circle"


def test_no_answer_is_given_away_by_earlier_turns(data):
    """No word of a turn's answer vocabulary occurs earlier in its record; count comes first."""
    for name in QA_SPLITS:
        for record in load(data, name):
            earlier: set[str] = set()
            for i, (human, gpt) in enumerate(qa_turns(record)):
                assert not VOCAB[gpt["qtype"]] & earlier, (record["id"], gpt["qtype"])
                assert gpt["qtype"] != "count" or i == 0, record["id"]
                earlier |= set(re.findall(r"[a-z]+", f"{human['value']} {gpt['value']}".lower()))


def test_answers_match_decoded_pixels(data, tracks):
    checked = dict.fromkeys(CHANCE, 0)
    for name in QA_SPLITS:
        for record in load(data, name):
            blobs = tracks[media_of(record)]
            for human, gpt in qa_turns(record):
                derived = answer_from_pixels(human["value"], gpt["qtype"], blobs)
                assert derived == gpt["value"], (record["id"], human["value"])
                checked[gpt["qtype"]] += 1
    assert min(checked.values()) >= 50, checked  # every type, on every turn of every record


def test_captions_match_decoded_pixels(data, tracks):
    for record in load(data, "stage1"):
        blobs = tracks[media_of(record)]
        caption = record["conversations"][1]["value"]
        if "video" in record:
            assert caption == video_caption_from_pixels(blobs), record["id"]
        else:
            assert set(caption.split(" and ")) == {
                f"a {b.colour} {b.shape}" for b in blobs.values()
            }


def test_draw_split_replays_the_generated_records_and_scenes(data):
    """Probes ask their own questions about a dataset's clips: `draw_split` must give the
    generated split's records and the scenes behind them, without writing anything."""
    files = {"train": ("stage1", "stage2"), "val": (None, "val"), "val_novel": (None, "val_novel")}
    for split, (caption_file, qa_file) in files.items():
        scenes, captions, qa = synthetic.draw_split(
            split, seed=0, num_train=NUM_TRAIN, size=SIZE, frames=FRAMES)
        assert qa == load(data, qa_file)
        assert captions == (load(data, caption_file) if caption_file else [])
        assert len(qa) == (synthetic.QA_ROUNDS if split == "train" else 1) * len(scenes)
        for i, record in enumerate(qa):
            scene = scenes[i % len(scenes)]
            assert scene.is_video == ("video" in record)
            if caption_file:
                caption = captions[i % len(scenes)]["conversations"][1]["value"]
                assert caption == synthetic.caption(scene)
            for turn in record["conversations"][1::2]:
                if turn["qtype"] == "count":
                    assert turn["value"] == synthetic.NUMBERS[len(scene.sprites) - 1]
    with pytest.raises(ValueError, match="unknown split 'stage2'"):
        synthetic.draw_split("stage2")


def test_two_shape_clips_need_more_than_one_frame(tracks):
    """One shape is missing from frame 0, and the two start moving at different frames."""
    clips = [blobs for path, blobs in tracks.items() if path.endswith(".mp4") and len(blobs) == 2]
    assert len(clips) >= 150
    for blobs in clips:
        a, b = blobs.values()
        assert min(a.first_frame, b.first_frame) == 0 < max(a.first_frame, b.first_frame)
        assert None not in (a.onset, b.onset) and a.onset != b.onset


def test_held_out_combos(data, tracks):
    meta = json.loads((data / "meta.json").read_text())
    assert {tuple(combo) for combo in meta["held_out_combos"]} == HELD_OUT
    for name in ALL_SPLITS:
        for record in load(data, name):
            combos = {(b.colour, b.shape) for b in tracks[media_of(record)].values()}
            assert bool(combos & HELD_OUT) == (name == "val_novel"), record["id"]


def test_question_types_balanced_and_chance_levels(data):
    meta = json.loads((data / "meta.json").read_text())
    assert meta["chance"] == CHANCE
    assert {qtype: set(answers) for qtype, answers in meta["answers"].items()} == VOCAB
    for name in QA_SPLITS:
        counts = dict.fromkeys(CHANCE, 0)
        answers = {qtype: dict.fromkeys(vocab, 0) for qtype, vocab in VOCAB.items()}
        for record in load(data, name):
            for human, gpt in qa_turns(record):
                counts[gpt["qtype"]] += 1
                answers[gpt["qtype"]][
                    synthetic.answer_key(gpt["qtype"], human["value"], gpt["value"])] += 1
        assert meta["splits"][name]["qtypes"] == counts
        assert meta["splits"][name]["answers"] == answers
        uniform = sum(counts.values()) / len(counts)
        assert all(abs(count - uniform) <= 0.1 * uniform for count in counts.values()), counts
    # Within a type the answers are near uniform too: always guessing one answer stays near chance.
    for qtype, counts in meta["splits"]["stage2"]["answers"].items():
        assert max(counts.values()) / sum(counts.values()) <= 1.5 * CHANCE[qtype], (qtype, counts)


def test_same_seed_same_bytes_and_frames(data, twin):
    for name in ("stage1.json", "stage2.json", "val.json", "val_novel.json", "meta.json"):
        assert (data / name).read_bytes() == (twin / name).read_bytes(), name
    assert (data / "tokenizer/tokenizer.model").read_bytes() == (
        twin / "tokenizer/tokenizer.model"
    ).read_bytes()
    media = media_files(data)
    assert media == media_files(twin)
    for path in sorted(media):
        assert np.array_equal(decode(data, path), decode(twin, path)), path
        assert (data / path).read_bytes() == (twin / path).read_bytes(), path


def test_other_seed_differs(data, other_seed):
    assert json.loads((other_seed / "meta.json").read_text())["args"]["seed"] == 1
    assert (data / "stage2.json").read_bytes() != (other_seed / "stage2.json").read_bytes()
    clips = sorted(p for p in media_files(data) & media_files(other_seed) if p.endswith(".mp4"))
    assert len(clips) > 100
    for path in clips[:5]:
        assert not np.array_equal(decode(data, path), decode(other_seed, path)), path


def test_generate_skips_a_complete_dataset_and_rebuilds_a_changed_one(tmp_path):
    small = {"seed": 3, "size": 64, "frames": 8}
    synthetic.generate(tmp_path, num_train=6, **small)
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    synthetic.generate(tmp_path, num_train=6, **small)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written

    synthetic.generate(tmp_path, num_train=4, **small)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["args"]["num_train"] == 4 and meta["splits"]["stage2"]["records"] == 4 * 6
    referenced = {media_of(r) for name in ALL_SPLITS for r in load(tmp_path, name)}
    on_disk = media_files(tmp_path)
    assert on_disk == referenced  # the media of the two dropped train scenes are gone
    clip = next(path for path in on_disk if path.endswith(".mp4"))
    assert decode(tmp_path, clip).shape == (8, 64, 64, 3)


def test_qa_rounds_add_questions_and_change_nothing_else(tmp_path):
    """Later QA rounds ask other questions about the same scenes; the scenes, the captions, the
    first round and the tokenizer (so stage 1) are those of a one-round dataset."""
    small = {"seed": 3, "size": 64, "frames": 8, "num_train": 30}
    one = synthetic.generate(tmp_path / "one", qa_rounds=1, **small)
    three = synthetic.generate(tmp_path / "three", qa_rounds=3, **small)
    for key in ("stage1", "val", "val_novel"):
        assert one[key].read_bytes() == three[key].read_bytes(), key
    assert (one["tokenizer"] / "tokenizer.model").read_bytes() == (
        three["tokenizer"] / "tokenizer.model").read_bytes()
    first, rounds = load(tmp_path / "one", "stage2"), load(tmp_path / "three", "stage2")
    assert rounds[:30] == first and len(rounds) == 90
    asked = [tuple(h["value"].split("\n")[-1] for h, _ in qa_turns(r)) for r in rounds]
    # Each round is planned on its own, so a scene is rarely asked the same turns twice.
    repeats = sum(len({asked[i], asked[i + 30], asked[i + 60]}) < 3 for i in range(30))
    assert repeats <= 3, repeats
    with pytest.raises(ValueError, match="qa_rounds must be positive"):
        synthetic.generate(tmp_path / "none", qa_rounds=0, **small)


def test_later_rounds_ask_about_the_other_shape():
    """A question type that two rounds ask of a two-shape clip is asked about each shape once:
    the clip's answers then differ by the question's colour (or shape) word alone."""
    scenes, _, records = synthetic.draw_split("train", seed=0, num_train=300)
    asked = {}  # (scene, qtype) -> the sprites named by the rounds that ask it, in round order
    for record in records:
        scene_index = int(record["id"].split("_")[2])
        sprites = scenes[scene_index].sprites
        for human, gpt in qa_turns(record):
            if gpt["qtype"] in ("colour", "shape", "direction") and len(sprites) == 2:
                who = named(human["value"].split("\n")[-1], dict(enumerate(sprites)))
                assert len(who) == 1, human["value"]
                asked.setdefault((scene_index, gpt["qtype"]), []).extend(who)
    asked_twice = [names for names in asked.values() if len(names) >= 2]
    assert len(asked_twice) > 100
    assert all(names[0] != names[1] for names in asked_twice)


def test_generate_links_an_identical_dataset_instead_of_generating_it(tmp_path):
    small = {"seed": 3, "size": 64, "frames": 8}
    synthetic.generate(tmp_path / "a", num_train=6, **small)
    source = {p.relative_to(tmp_path / "a"): p for p in (tmp_path / "a").rglob("*") if p.is_file()}
    # A stale dataset of other arguments in the target is replaced, none of its media left.
    synthetic.generate(tmp_path / "b", num_train=9, **small)
    synthetic.generate(tmp_path / "b", num_train=6, copy_from=tmp_path / "a", **small)
    linked = {p.relative_to(tmp_path / "b"): p for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert set(linked) == set(source)
    assert all(linked[p].samefile(source[p]) for p in source)  # links, not new files
    assert media_files(tmp_path / "b") == {media_of(r) for name in ALL_SPLITS
                                           for r in load(tmp_path / "b", name)}
    # Other arguments than the source's: generated, not linked, and the same bytes as generating.
    synthetic.generate(tmp_path / "c", num_train=5, copy_from=tmp_path / "a", **small)
    synthetic.generate(tmp_path / "d", num_train=5, **small)
    meta = (tmp_path / "c" / "meta.json")
    assert not meta.samefile(tmp_path / "a" / "meta.json")
    assert meta.read_bytes() == (tmp_path / "d" / "meta.json").read_bytes()


def test_tokenizer_round_trips_the_templates(data):
    folder = data / "tokenizer"
    assert {p.name for p in folder.iterdir()} == {
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == synthetic.TOKENIZER_VOCAB
    sentencepiece = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    conversation = (
        f"{tokens.SYSTEM_V1}\n\n### Human: What colour is the circle?\n### Assistant: red\n"
        "### Human: Which way does the red object move?\n### Assistant: left\n###"
    )
    inference = f"{tokens.SYSTEM_INFERENCE}\n\n### Human: How many shapes are there? \n###"
    for text in (conversation, inference, tokens.SYSTEM_V1, "### Human:", "### Assistant:"):
        ids = tokenizer(text)["input_ids"]
        # The fast tokenizer transformers builds from tokenizer.model is the sentencepiece model.
        assert ids == [tokenizer.bos_token_id, *sentencepiece.encode(text)]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # The template's fixed strings are whole pieces, as in LLaMA's vocabulary.
    pieces = tokenizer.tokenize("### Human: red\n### Assistant:")
    assert pieces == "▁### ▁Human : ▁red <0x0A> ### ▁Assistant :".split()
    assert len(tokenizer(tokens.SYSTEM_V1, add_special_tokens=False)["input_ids"]) <= 32
    # Valley's tokens are added by the data pipeline, not here.
    vocabulary = tokenizer.get_vocab()
    assert not {*tokens.ADDED_TOKENS, tokens.PAD, tokens.VIDEO, tokens.IMAGE} & set(vocabulary)


def test_replies_fit_the_trainers_answer_budget(data):
    """The trainer's evaluation generates at most `eval.max_new_tokens` per answer: every reply
    of the held-out sets, and the stop after it, must fit (8 cut the longer move-order replies)."""
    from valley_jax import qa, run_config

    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    budget = run_config.base("finetune").eval.max_new_tokens
    stop = len(qa.stop_ids(tokenizer))
    longest = max(len(tokenizer.encode(" " + gpt["value"], add_special_tokens=False))
                  for name in ("val", "val_novel") for record in load(data, name)
                  for _, gpt in qa_turns(record))
    assert longest == 11 and longest + stop <= budget


def _demo_probe():
    import importlib.util

    path = Path(__file__).parent.parent / "bench" / "demo_probe.py"
    spec = importlib.util.spec_from_file_location("demo_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_probe_questions_and_scores(data):
    probe = _demo_probe()
    meta_args = json.loads((data / "meta.json").read_text())["args"]
    records = probe.probe_records("val", meta_args, None)
    captions = [r for r in records if r["conversations"][1]["qtype"] == "caption_val"]
    orders = [r for r in records if r["conversations"][1]["qtype"] == "order_val"]
    assert len(orders) == 2 * len(captions) > 20
    for caption in captions:  # the truths agree with the caption's order, read independently
        first = re.match(r"a (\w+) ", caption["conversations"][1]["value"]).group(1)
        assert first == caption["first"]
        pair = [r for r in orders if r["clip"] == caption["id"].removesuffix("_caption")]
        answers = {r["conversations"][0]["value"].split("Does the ")[1].split()[0]:
                   r["conversations"][1]["value"] for r in pair}
        second = next(colour for colour in answers if colour != first)
        truth = f"The {first} object moves first, then the {second} object."
        assert set(answers.values()) == {truth}  # asked either way

    truth = {r["id"]: r["conversations"][1]["value"] for r in records}
    perfect = probe.score(records, truth)
    assert perfect["caption_val"] == dict(clips=len(captions), first_mover_named_first=1.0,
                                          exact=1.0)
    assert perfect["order_val"] == dict(questions=len(orders), accuracy=1.0,
                                        clips_answered_alike=1.0)
    # Replies that repeat the question's order: exactly half right, no clip answered alike;
    # captions naming the second mover first score 0 on order and on the exact caption.
    asked = [re.match(r"Does the (\w+) object move before or after the (\w+) object",
                      r["conversations"][0]["value"].split("\n")[1]).groups() for r in orders]
    repeat = {r["id"]: f"The {a} object moves first, then the {b} object."
              for r, (a, b) in zip(orders, asked)}
    swapped = {c["id"]: ", then ".join(truth[c["id"]].split(", then ")[::-1]) for c in captions}
    worst = probe.score(records, {**truth, **repeat, **swapped})
    assert worst["order_val"] == dict(questions=len(orders), accuracy=0.5,
                                      clips_answered_alike=0.0)
    assert worst["caption_val"]["first_mover_named_first"] == 0.0
    assert worst["caption_val"]["exact"] == 0.0

    # Shape and colour questions about each of a clip's two shapes: the truths differ and come
    # from the caption; a model that answers every question of a clip with the shape (colour) of
    # its first mover is right exactly half the time and answers every clip alike.
    for qtype, field in (("shape", 2), ("colour", 1)):
        group = [r for r in records if r["conversations"][1]["qtype"] == f"{qtype}_val"]
        assert len(group) == 2 * len(captions)
        blind = {}
        for caption in captions:
            clip = caption["id"].removesuffix("_caption")
            pair = [r for r in group if r["clip"] == clip]
            movers = [m.split() for m in re.findall(r"a (\w+ \w+) moves", truth[caption["id"]])]
            assert sorted(truth[r["id"]] for r in pair) == sorted(m[field - 1] for m in movers)
            blind.update({r["id"]: movers[0][field - 1] for r in pair})
        assert perfect[f"{qtype}_val"] == dict(questions=len(group), accuracy=1.0,
                                               clips_answered_alike=0.0)
        assert probe.score(records, {**truth, **blind})[f"{qtype}_val"] == dict(
            questions=len(group), accuracy=0.5, clips_answered_alike=1.0)


def test_media_written_on_threads_are_the_bytes_written_on_one(tmp_path, monkeypatch):
    small = {"seed": 5, "size": 64, "frames": 8, "num_train": 10}
    synthetic.generate(tmp_path / "two", **small)
    monkeypatch.setattr(synthetic, "WRITE_THREADS", 1)
    synthetic.generate(tmp_path / "one", **small)

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    two, one = files(tmp_path / "two"), files(tmp_path / "one")
    assert synthetic.WRITE_THREADS == 1 and len(two) == len(one) > 20
    assert two == one


def test_a_media_write_that_fails_fails_the_generation_unfinished(tmp_path, monkeypatch):
    write_video = synthetic.write_video

    def fail_on_the_third(path, frames):
        if path.name == "train_00002.mp4":
            raise OSError(f"{path}: disk full")
        write_video(path, frames)

    monkeypatch.setattr(synthetic, "write_video", fail_on_the_third)
    with pytest.raises(OSError, match="train_00002.mp4: disk full"):
        synthetic.generate(tmp_path / "w", seed=5, size=64, frames=8, num_train=10)
    # No meta.json: the next run generates it all again rather than taking it as complete.
    assert not (tmp_path / "w" / "meta.json").exists()
