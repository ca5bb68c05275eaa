"""Tiny data made inside the tests: a sentencepiece tokenizer, mp4 videos, images, JSON datasets.

Shared by the tests/test_data_*.py modules (imported by name; it holds no tests itself). The loader
spawns worker processes, which read absl flags: they must count as parsed under pytest.
"""

import json
import os

import av
import numpy as np
import pytest
import sentencepiece
from absl import flags
from PIL import Image

from valley_jax import tokens
from valley_jax.data.config import DataConfig, DatasetSpec

flags.FLAGS.mark_as_parsed()

# Small enough for fast tests, large enough that the media block (num_patches + T + 4) and a
# conversation fit comfortably.
NUM_PATCHES = 16
NUM_FRAMES = 4
MAX_LENGTH = 384

_CORPUS = [
    tokens.SYSTEM_V1,
    tokens.SYSTEM_V1.lower(),
    "### Human: What is happening in the video?\n### Assistant: A cat chases a red ball across the floor.",
    "### Human: Describe the image in detail.\n### Assistant: Two dogs run in a green park near a river.",
    "### Human: How many people are there?\n### Assistant: There are three people standing by a car.",
    "What colour is the sky? The sky is blue and the sun is shining over the hills.",
    "The man opens the door, walks into the kitchen and makes a cup of coffee.",
] * 20


def make_tokenizer(folder: str) -> str:
    """A LLaMA-format tokenizer folder (tokenizer.model + tokenizer_config.json), trained in ms."""
    os.makedirs(folder, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS),
        model_prefix=os.path.join(folder, "tokenizer"),
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 4096,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return folder


def frame_value(index: int) -> int:
    """The grey level of frame `index` in `make_video` videos: frames are told apart by it."""
    return 12 + 20 * index


def make_video(path: str, num_frames: int, width: int = 96, height: int = 64, fps: int = 10) -> str:
    """An H.264 mp4 whose frame i is a flat grey of frame_value(i) with a light square whose
    position drifts (so resizing has edges to get right). Odd sizes are stored as 4:4:4 (4:2:0
    needs even ones)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        odd = width % 2 or height % 2
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p" if odd else "yuv420p"
        for i in range(num_frames):
            frame = np.full((height, width, 3), frame_value(i) % 256, np.uint8)
            frame[10 : 10 + height // 3, 5 + i : 5 + i + width // 3] = 230
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth but not flat picture, so bicubic resampling is really exercised."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], -1)
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(((x * 7 + y * 3) % 256).astype(np.uint8), "L")
        image.putalpha(alpha)
        return image
    return image.convert(mode)


def make_image(path: str, width: int, height: int, mode: str = "RGB") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    gradient_image(width, height, mode).save(path)
    return path


def conversation(question: str, answer: str, placeholder: str = "") -> list[dict]:
    value = f"{placeholder}\n{question}" if placeholder else question
    return [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]


def write_json(path: str, records: list) -> str:
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def data_config(tokenizer_dir: str, datasets, **overrides) -> DataConfig:
    settings = dict(
        datasets=tuple(datasets),
        tokenizer_path=tokenizer_dir,
        num_frames=NUM_FRAMES,
        num_patches=NUM_PATCHES,
        max_length=MAX_LENGTH,
        batch_size=2,
        num_workers=0,
        seed=3,
    )
    settings.update(overrides)
    return DataConfig(**settings)


def make_mixed_dataset(root: str, num_videos: int = 6, num_images: int = 3, num_text: int = 3) -> DatasetSpec:
    """A JSON dataset of videos (various lengths, one in a `source` folder), images and text-only
    records, with videos under root/videos and images under root/images."""
    video_root, image_root = os.path.join(root, "videos"), os.path.join(root, "images")
    records = []
    for i in range(num_videos):
        source = "clips" if i % 3 == 0 else None
        relative = f"v{i}.mp4"
        make_video(os.path.join(video_root, source or "", relative), num_frames=3 + 2 * i)
        record = {"id": f"video{i}", "video": relative, "conversations": conversation(
            f"What happens in clip {i}?", f"Clip {i} shows a square moving right.", tokens.VIDEO)}
        if source:
            record["source"] = source
        records.append(record)
    for i in range(num_images):
        make_image(os.path.join(image_root, f"i{i}.png"), 40 + 7 * i, 30 + 11 * i)
        records.append({"id": f"image{i}", "image": f"i{i}.png", "conversations": conversation(
            "Describe the image.", f"A gradient, number {i}.", tokens.IMAGE)})
    for i in range(num_text):
        records.append({"id": f"text{i}", "conversations": conversation(
            f"What is {i} plus {i}?", f"It is {2 * i}.") + conversation("And doubled?", f"{4 * i}.")})
    path = write_json(os.path.join(root, "data.json"), records)
    return DatasetSpec(path, video_root=video_root, image_root=image_root)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    return make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
