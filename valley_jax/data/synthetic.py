"""A synthetic video world for the built-in demo and the tests.

No real dataset or pretrained weight can be downloaded everywhere this project runs, yet the whole
pipeline must be shown to learn. This module writes a small, honest video-understanding task in
Valley's own data format: mp4 clips (and a few still images) of one or two coloured shapes that
appear and move, one-turn captions for stage 1, multi-turn question answering for stage 2, two
held-out splits, and a small sentencepiece tokenizer trained on the text.

The task is built so that answers need the pixels, and some need their order:

- Two-shape clips are staggered: one shape is there from the first frame, the other pops in a
  few frames later, and the two move one after the other. Appearance order and motion order are
  drawn independently, so neither answers the other, and a single frame answers neither.
- Within a record no answer can be read off the text before it: a turn is only asked if no
  word of its answer vocabulary occurs in any earlier question or answer, and "how many" is only
  asked while the conversation has mentioned at most one shape.
- Colours are saturated and far apart, so that lossy video coding cannot confuse them.

Usage:
    python -m valley_jax.data.synthetic --out DIR [--seed S] [--num-train N] [--size PX] [--frames F]

`generate(out_dir, ...)` does the same from Python and returns the paths it wrote; it does nothing
when `out_dir/meta.json` (written last) records the same arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import re
from pathlib import Path

import av
import numpy as np
import sentencepiece as spm
from PIL import Image

from valley_jax import tokens

# Bump whenever the output for given arguments changes, so that stale demo sets are rebuilt.
VERSION = 1

COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 70, 235),
    "yellow": (240, 220, 30),
    "purple": (210, 40, 210),
    "cyan": (30, 210, 220),
}
SHAPES = ("square", "circle", "triangle")
# Image coordinates: y grows downwards.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
NUMBERS = ("one", "two")

# Never drawn in train or val; every val_novel sample contains at least one of them. Each colour
# and each shape still occurs in training, only these pairings are new.
HELD_OUT_COMBOS = (("red", "triangle"), ("green", "circle"), ("blue", "square"))

# The answer vocabulary of each question type; chance level is 1 / its size.
ANSWERS = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": NUMBERS,
    "direction": tuple(DIRECTIONS),
    "move_order": ("before", "after"),
    "appear_first": tuple(COLOURS),
}
QTYPES = tuple(ANSWERS)
CHANCE = {qtype: 1 / len(answers) for qtype, answers in ANSWERS.items()}

QUESTIONS = {
    "colour": ("What colour is the {ref}?", "Which colour does the {ref} have?"),
    "shape": ("What shape is the {ref}?", "Which shape is the {ref}?"),
    "count": ("How many shapes are there?", "How many shapes are in the {medium}?"),
    "direction": ("Which way does the {ref} move?", "In which direction does the {ref} move?"),
    "move_order": (
        "Does the {ref} move before or after the {other}?",
        "Does the {ref} start moving before or after the {other}?",
    ),
    "appear_first": ("Which colour appears first?", "What colour is the shape that appears first?"),
}
CAPTION_PROMPTS = {
    "video": ("Describe the video briefly.", "What happens in the video?", "Give a short caption for the video."),
    "image": ("Describe the image briefly.", "What is in the image?", "Give a short caption for the image."),
}

FPS = 8
CRF = 18  # high quality: interiors of shapes stay within a few levels of their colour
TWO_SHAPE_SHARE = 2 / 3  # the temporal questions need two shapes
IMAGE_SHARE = 0.1
TOKENIZER_VOCAB = 768
MIN_FRAMES = 8
MIN_SIZE = 48
_MEDIA_NAME = re.compile(r"^(train|val|val_novel)_\d{5}\.(mp4|png|jpg)$")


# ---------------------------------------------------------------------------------------------
# Scenes: what is drawn where, frame by frame.


@dataclasses.dataclass(frozen=True)
class Sprite:
    colour: str
    shape: str
    size: int
    x: int  # top-left corner before the sprite moves
    y: int
    direction: str | None  # None in still images
    distance: int
    appear: int  # first frame in which the sprite is drawn
    move_start: int  # it travels `distance` pixels between these two frames
    move_end: int

    def corner(self, t: int) -> tuple[int, int]:
        if self.direction is None:
            return self.x, self.y
        progress = min(max((t - self.move_start) / (self.move_end - self.move_start), 0.0), 1.0)
        dx, dy = DIRECTIONS[self.direction]
        step = round(progress * self.distance)
        return self.x + dx * step, self.y + dy * step

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    sprites: tuple[Sprite, ...]
    frames: int  # 1 for a still image
    size: int
    background: int  # grey level
    noise: int  # amplitude of a static noise texture on the background
    noise_seed: int

    @property
    def is_video(self) -> bool:
        return self.frames > 1


def _shape_mask(shape: str, size: int) -> np.ndarray:
    v, u = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (u - size / 2) ** 2 + (v - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":  # apex up; fills half of its bounding box, a circle ~0.79, a square 1
        return np.abs(u - size / 2) <= v / 2
    raise ValueError(shape)


def render(scene: Scene) -> np.ndarray:
    """The RGB frames of a scene, uint8 [frames, size, size, 3]."""
    rng = np.random.default_rng(scene.noise_seed)
    texture = rng.integers(-scene.noise, scene.noise + 1, (scene.size, scene.size, 1))
    background = np.clip(scene.background + texture, 0, 255).astype(np.uint8)
    frames = np.repeat(np.broadcast_to(background, (scene.size, scene.size, 3))[None], scene.frames, 0)
    for sprite in scene.sprites:
        mask = _shape_mask(sprite.shape, sprite.size)
        for t in range(sprite.appear, scene.frames):
            x, y = sprite.corner(t)
            frames[t, y : y + sprite.size, x : x + sprite.size][mask] = COLOURS[sprite.colour]
    return frames


def _boxes_apart(a: Sprite, b: Sprite, frames: int, margin: int) -> bool:
    for t in range(frames):
        (ax, ay), (bx, by) = a.corner(t), b.corner(t)
        if ax < bx + b.size + margin and bx < ax + a.size + margin and ay < by + b.size + margin and by < ay + a.size + margin:
            return False
    return True


def _timeline(rng: np.random.Generator, num_sprites: int, frames: int) -> list[tuple[int, int, int]]:
    """(appear, move_start, move_end) per sprite.

    With two sprites one is there from frame 0 and the other pops in by frame frames//4; then
    they move one after the other. Which one appears late and which moves first are drawn
    independently, and both events fall between frames that an 8-frame uniform sampler keeps.
    """
    if frames == 1:
        return [(0, 0, 0)] * num_sprites
    if num_sprites == 1:
        start = int(rng.integers(0, frames // 4 + 1))
        end = int(rng.integers(start + frames // 2, frames))
        return [(0, start, end)]
    late = int(rng.integers(2))
    first_mover = int(rng.integers(2))
    appear = [0, 0]
    appear[late] = int(rng.integers(1, frames // 4 + 1))
    first_start = frames // 4 + 1
    span = (frames - 1 - first_start) // 2
    moves = [(first_start, first_start + span), (first_start + span, frames - 1)]
    if first_mover == 1:
        moves.reverse()
    return [(appear[i], *moves[i]) for i in range(2)]


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _shapes_for(colour: str, novel: bool) -> list[str]:
    return [shape for shape in SHAPES if novel or (colour, shape) not in HELD_OUT_COMBOS]


def sample_scene(rng: np.random.Generator, *, size: int, frames: int, is_video: bool, novel: bool) -> Scene:
    """One scene; in a novel scene at least one sprite is a held-out colour-shape combination."""
    num_sprites = 2 if rng.random() < TWO_SHAPE_SHARE else 1
    if novel:
        combos = [_pick(rng, HELD_OUT_COMBOS)]
    else:
        # Colour first, then a shape allowed with it: colour answers stay uniform although
        # some colours lose a shape to the held-out set.
        colour = _pick(rng, tuple(COLOURS))
        combos = [(colour, _pick(rng, _shapes_for(colour, novel)))]
    if num_sprites == 2:
        # Distinct colours and shapes within a scene, so "the circle" or "the red object" is unique.
        colour = _pick(rng, [c for c in COLOURS if c != combos[0][0]])
        combos.append((colour, _pick(rng, [s for s in _shapes_for(colour, novel) if s != combos[0][1]])))
        if rng.random() < 0.5:
            combos.reverse()  # the novel sprite is not always the first one in the timeline
    num_frames = frames if is_video else 1
    timeline = _timeline(rng, num_sprites, num_frames)
    margin = 3  # keeps shapes off the border, where the codec blurs most
    for _ in range(1000):
        sprites = []
        for (colour, shape), (appear, move_start, move_end) in zip(combos, timeline):
            sprite_size = int(rng.integers(round(0.2 * size), round(0.26 * size) + 1))
            room = size - 2 * margin - sprite_size
            if is_video:
                direction = _pick(rng, tuple(DIRECTIONS))
                distance = int(rng.integers(round(0.3 * size), round(0.45 * size) + 1))
                dx, dy = DIRECTIONS[direction]
                # The start is drawn so that the whole path stays inside the frame.
                x_lo, x_hi = margin + max(0, -dx * distance), margin + room - max(0, dx * distance)
                y_lo, y_hi = margin + max(0, -dy * distance), margin + room - max(0, dy * distance)
            else:
                direction, distance = None, 0
                x_lo, x_hi, y_lo, y_hi = margin, margin + room, margin, margin + room
            x, y = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))
            sprites.append(Sprite(colour, shape, sprite_size, x, y, direction, distance, appear, move_start, move_end))
        if len(sprites) == 1 or _boxes_apart(sprites[0], sprites[1], num_frames, margin=4):
            break
    else:
        raise RuntimeError("could not place two shapes apart; is the frame too small?")
    return Scene(
        sprites=tuple(sprites),
        frames=num_frames,
        size=size,
        background=int(rng.integers(70, 151)),
        noise=_pick(rng, (0, 6)),
        noise_seed=int(rng.integers(2**31)),
    )


# ---------------------------------------------------------------------------------------------
# Text: captions and question answering.


def caption(scene: Scene) -> str:
    if not scene.is_video:
        return " and ".join(f"a {sprite.name}" for sprite in scene.sprites)
    by_motion = sorted(scene.sprites, key=lambda sprite: sprite.move_start)
    return ", then ".join(f"a {sprite.name} moves {sprite.direction}" for sprite in by_motion)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _eligible(scene: Scene) -> tuple[str, ...]:
    if not scene.is_video:
        return ("colour", "shape", "count")
    if len(scene.sprites) == 1:
        return ("colour", "shape", "count", "direction")
    return QTYPES


def _ref(sprite: Sprite, by: str) -> str:
    return sprite.shape if by == "shape" else f"{sprite.colour} object"


@dataclasses.dataclass
class Tally:
    """How often a split has asked each question type, and given each answer of each type."""

    qtypes: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(QTYPES, 0))
    answers: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {qtype: dict.fromkeys(answers, 0) for qtype, answers in ANSWERS.items()}
    )

    def excess(self, qtype: str, answer: str) -> float:
        """How many turns this answer is ahead of a uniform share of its type (0 when behind)."""
        return max(0.0, self.answers[qtype][answer] - self.qtypes[qtype] / len(ANSWERS[qtype]))

    def add(self, qtype: str, answer: str) -> None:
        self.qtypes[qtype] += 1
        self.answers[qtype][answer] += 1


def _ways_to_ask(qtype: str, scene: Scene) -> list[tuple[tuple[int, ...], str]]:
    """Each way to ask `qtype` about the scene: (indices of the sprites it names, answer)."""
    sprites = scene.sprites
    if qtype == "colour":
        return [((i,), sprite.colour) for i, sprite in enumerate(sprites)]
    if qtype == "shape":
        return [((i,), sprite.shape) for i, sprite in enumerate(sprites)]
    if qtype == "direction":
        return [((i,), sprite.direction) for i, sprite in enumerate(sprites)]
    if qtype == "count":
        return [((), NUMBERS[len(sprites) - 1])]
    if qtype == "move_order":
        return [((i, 1 - i), "before" if sprites[i].move_start < sprites[1 - i].move_start else "after") for i in range(2)]
    if qtype == "appear_first":
        return [((), min(sprites, key=lambda sprite: sprite.appear).colour)]
    raise ValueError(qtype)


def _handle(mentioned: set[str], remaining: list[str], tally: Tally, rng: np.random.Generator) -> str:
    """Whether a direction / order question names shapes by shape or by colour.

    Naming a colour rules out later colour answers in the record, naming a shape rules out
    later shape answers; spend the kind already named, else the one whose questions are needed less.
    """
    if mentioned & set(COLOURS):
        return "colour"
    if mentioned & set(SHAPES):
        return "shape"
    colour_need = min((tally.qtypes[q] for q in remaining if q in ("colour", "appear_first")), default=math.inf)
    shape_need = min((tally.qtypes[q] for q in remaining if q == "shape"), default=math.inf)
    if colour_need == shape_need:
        return _pick(rng, ("colour", "shape"))
    return "colour" if colour_need > shape_need else "shape"


def _question(qtype: str, scene: Scene, named: tuple[int, ...], handle: str, rng: np.random.Generator) -> str:
    template = _pick(rng, QUESTIONS[qtype])
    refs = [scene.sprites[i] for i in named]
    if qtype == "colour":
        return template.format(ref=refs[0].shape)
    if qtype == "shape":
        return template.format(ref=_ref(refs[0], "colour"))
    if qtype == "direction":
        return template.format(ref=_ref(refs[0], handle))
    if qtype == "move_order":
        return template.format(ref=_ref(refs[0], handle), other=_ref(refs[1], handle))
    return template.format(medium="video" if scene.is_video else "image")


def plan_qa(scene: Scene, num_turns: int, tally: Tally, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Up to `num_turns` (question, answer, qtype) turns, at least two.

    Greedy: the question type used least so far in the split goes first, asked about the
    sprite whose answer is rarest; an answer already over its uniform share counts against its
    type. This keeps both the types and the answers within each type near uniform, so that
    neither a type prior nor a constant guess beats chance. `tally` is updated in place.
    """
    turns: list[tuple[str, str, str]] = []
    mentioned: set[str] = set()
    named_so_far: set[int] = set()
    for _ in range(num_turns):
        used = {qtype for _, _, qtype in turns}
        candidates = [q for q in _eligible(scene) if q not in used and not set(ANSWERS[q]) & mentioned]
        # Two shapes named, or a question that presumes two, give the count away.
        if len(named_so_far) > 1 or used & {"move_order", "appear_first"}:
            candidates = [q for q in candidates if q != "count"]
        if not candidates:
            break
        choice = {}
        for q in candidates:
            ways = _ways_to_ask(q, scene)
            rarest = min(tally.answers[q][answer] for _, answer in ways)
            choice[q] = _pick(rng, [way for way in ways if tally.answers[q][way[1]] == rarest])
        qtype = min(candidates, key=lambda q: (tally.qtypes[q] + tally.excess(q, choice[q][1]), rng.random()))
        named, answer = choice[qtype]
        handle = _handle(mentioned, [q for q in candidates if q != qtype], tally, rng)
        question = _question(qtype, scene, named, handle, rng)
        turns.append((question, answer, qtype))
        tally.add(qtype, answer)
        mentioned |= _words(question) | _words(answer)
        named_so_far |= set(named)
    assert len(turns) >= 2, "every scene supports count plus one more question"
    return turns


def _placeholder(scene: Scene) -> str:
    return tokens.VIDEO if scene.is_video else tokens.IMAGE


def _caption_record(record_id: str, media: dict, scene: Scene, rng: np.random.Generator) -> dict:
    prompt = _pick(rng, CAPTION_PROMPTS["video" if scene.is_video else "image"])
    return {
        "id": record_id,
        **media,
        "conversations": [
            {"from": "human", "value": f"{_placeholder(scene)}\n{prompt}"},
            {"from": "gpt", "value": caption(scene)},
        ],
    }


def _qa_record(record_id: str, media: dict, scene: Scene, tally: Tally, rng: np.random.Generator) -> dict:
    turns = plan_qa(scene, int(rng.integers(2, 4)), tally, rng)
    conversations = []
    for i, (question, answer, qtype) in enumerate(turns):
        value = f"{_placeholder(scene)}\n{question}" if i == 0 else question
        conversations.append({"from": "human", "value": value})
        conversations.append({"from": "gpt", "value": answer, "qtype": qtype})
    return {"id": record_id, **media, "qtypes": [qtype for _, _, qtype in turns], "conversations": conversations}


# ---------------------------------------------------------------------------------------------
# Files.


def video_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path: Path, frames: np.ndarray) -> None:
    codec = video_codec()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # One encoder thread: the bytes must not depend on the machine.
        stream.options = {"crf": str(CRF), "threads": "1"} if codec == "libx264" else {"qscale": "2", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path: Path, frame: np.ndarray) -> None:
    image = Image.fromarray(frame)
    if path.suffix == ".jpg":
        image.save(path, quality=95)
    else:
        image.save(path)


def _v1_conversation(record: dict) -> str:
    """The record as the v1 training template renders it, placeholders left out."""
    text = tokens.SYSTEM_V1 + "\n\n"
    for turn in record["conversations"]:
        value = turn["value"].replace(tokens.VIDEO + "\n", "").replace(tokens.IMAGE + "\n", "")
        role = tokens.ROLES[0] if turn["from"] == "human" else tokens.ROLES[1]
        text += f"{tokens.SEP} {role}: {value}\n"
    return text + tokens.SEP


def _inference_prompt(question: str) -> str:
    return f"{tokens.SYSTEM_INFERENCE}\n\n{tokens.SEP} {tokens.ROLES[0]}: {question} \n{tokens.SEP}"


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """A LLaMA-style sentencepiece BPE tokenizer, saved as a Hugging Face LlamaTokenizer folder.

    BPE (not unigram) because transformers 5 converts tokenizer.model into a fast BPE tokenizer,
    which reproduces a BPE model exactly. Newlines are not in the training sentences: as in
    LLaMA they become the byte piece <0x0A>.
    """
    sentences = [line for text in texts for line in text.split("\n") if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a tiny corpus may run out of merges first
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": True,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)
    return out_dir


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# The dataset.


def _split_sizes(num_train: int) -> dict[str, int]:
    return {"train": num_train, "val": max(30, num_train // 10), "val_novel": max(30, num_train // 10)}


def _media(root: Path, split: str, index: int, scene: Scene, rng: np.random.Generator) -> dict:
    """Renders and writes one scene; returns the record's media field."""
    stem = f"{split}_{index:05d}"
    frames = render(scene)
    if scene.is_video:
        relative = f"videos/{stem}.mp4"
        write_video(root / relative, frames)
        return {"video": relative}
    relative = f"images/{stem}.{_pick(rng, ('png', 'jpg'))}"
    write_image(root / relative, frames[0])
    return {"image": relative}


def _qtype_counts(records: list[dict]) -> dict[str, int]:
    counts = dict.fromkeys(QTYPES, 0)
    for record in records:
        for qtype in record["qtypes"]:
            counts[qtype] += 1
    return counts


def _paths(root: Path) -> dict[str, Path]:
    names = {
        "stage1": "stage1.json",
        "stage2": "stage2.json",
        "val": "val.json",
        "val_novel": "val_novel.json",
        "tokenizer": "tokenizer",
        "videos": "videos",
        "images": "images",
        "meta": "meta.json",
    }
    return {"root": root, **{key: root / name for key, name in names.items()}}


def generate(out_dir, *, seed: int = 0, num_train: int = 1500, size: int = 112, frames: int = 16) -> dict[str, Path]:
    """Writes the synthetic dataset under `out_dir` and returns its paths (see `_paths`).

    Idempotent: when `out_dir/meta.json` records the same arguments, nothing is written.
    `num_train` is the number of stage-2 QA records and also of stage-1 captions; each train
    scene (10% of them stills) gets one caption and one QA record.
    """
    if frames < MIN_FRAMES or size < MIN_SIZE or size % 2:
        raise ValueError(f"need frames >= {MIN_FRAMES} and an even size >= {MIN_SIZE}, got {frames}, {size}")
    if num_train < 1:
        raise ValueError("num_train must be positive")
    args = {"version": VERSION, "seed": seed, "num_train": num_train, "size": size, "frames": frames, "codec": video_codec()}
    root = Path(out_dir)
    paths = _paths(root)
    if paths["meta"].exists() and json.loads(paths["meta"].read_text()).get("args") == args:
        return paths

    paths["meta"].unlink(missing_ok=True)  # a run cut short must not look complete
    for folder in (paths["videos"], paths["images"]):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if _MEDIA_NAME.match(stale.name):
                stale.unlink()

    splits: dict[str, list[dict]] = {}
    media_counts: dict[str, dict[str, int]] = {}
    for split_index, (split, count) in enumerate(_split_sizes(num_train).items()):
        # One stream per split: the val sets do not shift when num_train changes their size.
        rng = np.random.default_rng([seed, split_index])
        tally = Tally()
        captions, qa = [], []
        for i in range(count):
            scene = sample_scene(rng, size=size, frames=frames, is_video=rng.random() >= IMAGE_SHARE, novel=split == "val_novel")
            media = _media(root, split, i, scene, rng)
            if split == "train":
                captions.append(_caption_record(f"train_caption_{i:05d}", media, scene, rng))
            qa.append(_qa_record(f"{split}_qa_{i:05d}", media, scene, tally, rng))
        if split == "train":
            splits["stage1"], splits["stage2"] = captions, qa
        else:
            splits[split] = qa
        media_counts[split] = {
            "videos": sum("video" in r for r in qa),
            "images": sum("image" in r for r in qa),
        }
    for name, records in splits.items():
        _write_json(paths[name], records)

    train_records = splits["stage1"] + splits["stage2"]
    texts = [_v1_conversation(r) for r in train_records]
    texts += [_inference_prompt(r["conversations"][0]["value"].split("\n", 1)[1]) for r in splits["stage2"]]
    train_tokenizer(texts, paths["tokenizer"])
    tokenizer_size = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"] / "tokenizer.model")).get_piece_size()

    meta = {
        "generator": "valley_jax.data.synthetic",
        "args": args,
        "files": {key: str(path.relative_to(root)) for key, path in paths.items() if key != "root"},
        "records": {name: len(records) for name, records in splits.items()},
        "media": {"stage1": media_counts["train"], "stage2": media_counts["train"], "val": media_counts["val"], "val_novel": media_counts["val_novel"]},
        "qtypes": {name: _qtype_counts(records) for name, records in splits.items() if name != "stage1"},
        "turns": {name: sum(len(r["qtypes"]) for r in records) for name, records in splits.items() if name != "stage1"},
        "answers": {qtype: list(answers) for qtype, answers in ANSWERS.items()},
        "chance": CHANCE,
        "held_out_combos": [list(combo) for combo in HELD_OUT_COMBOS],
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "fps": FPS,
        "tokenizer_vocab_size": tokenizer_size,
    }
    _write_json(paths["meta"], meta)  # last: its presence marks a complete dataset
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=1500, help="stage-2 QA records (and stage-1 captions)")
    parser.add_argument("--size", type=int, default=112, help="frame side in pixels")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    args = parser.parse_args(argv)
    paths = generate(args.out, seed=args.seed, num_train=args.num_train, size=args.size, frames=args.frames)
    meta = json.loads(paths["meta"].read_text())
    print(json.dumps({"out": str(paths["root"]), "records": meta["records"], "qtypes": meta["qtypes"]}, indent=1))


if __name__ == "__main__":
    main()
