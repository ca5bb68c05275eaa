"""The CPU demo's stand-in for CLIP: its from-scratch ViT pretrained to tag frames.

Valley reads frames with a pretrained CLIP ViT-L/14 and keeps it frozen. The demo cannot
download CLIP, and a ViT that learns only through the LLM's answers learns which shape is which
colour slowly (held-out shape answers 0.55-0.70 after 3000 stage-2 steps; BENCHMARKS.md, "CPU
demo"). So, when `config.init.vision_pretrain_steps` is set (the demo's stage 1), the trainer
first pretrains the ViT the way vision towers are commonly pretrained, on labels from text: from
one frame of each training clip (its last, where every shape has appeared) and each still, it
predicts which colour-shape pairs the record's caption names (`caption_tags`: 6 colours x 3
shapes, sigmoid cross-entropy). The labels are read through the features Valley uses (the
selected layer's tokens, mean- and max-pooled into a linear head that is then thrown away).
Only the training split's captions are used; the held-out tenth of them is scored to show what
the tower learned. The result is saved as the run's initial checkpoint (`WORKDIR/init`), so a
resumed run does not pretrain again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from valley_jax.data import frames as frames_lib
from valley_jax.data import synthetic
from valley_jax.data.skips import SkipRecord

log = logging.getLogger(__name__)

TAGS = tuple(f"{colour} {shape}" for colour in synthetic.COLOURS for shape in synthetic.SHAPES)
_TAG = re.compile(r"\b(%s) (%s)\b" % ("|".join(synthetic.COLOURS), "|".join(synthetic.SHAPES)))


def caption_tags(caption: str) -> np.ndarray:
    """float32 [len(TAGS)]: 1 for each colour-shape pair the caption names."""
    tags = np.zeros(len(TAGS), np.float32)
    for colour, shape in _TAG.findall(caption):
        tags[TAGS.index(f"{colour} {shape}")] = 1
    return tags


def tagged_frames(records_path: str, root: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, size, size, 3] (short side resized to `size`, centre square) and tags [N, 18]:
    the last frame of each video record, each image record, and its caption's tags. Records
    whose caption names no pair are left out."""
    frames, tags, skipped = [], [], 0
    with open(records_path) as f:
        records = json.load(f)
    for record in records:
        tag = caption_tags(record["conversations"][1]["value"])
        if not tag.any():
            continue
        try:
            if "video" in record:
                video = frames_lib.VideoFile(os.path.join(root, record["video"]))
                frame = video.read(np.asarray([video.length - 1]))
                frames.append(frames_lib.resize_and_center_crop(frame, size, size, "bilinear")[0])
            else:
                frames.append(_read_image(os.path.join(root, record["image"]), size))
        except SkipRecord as e:
            skipped += 1
            log.warning("vision pretraining skips record %s: %s", record.get("id"), e)
            continue
        tags.append(tag)
    if skipped:
        log.warning("vision pretraining skipped %d of %d records", skipped, len(records))
    if not frames:
        raise ValueError(f"{records_path}: no record's caption names a colour and a shape "
                         f"(vision pretraining reads the synthetic world's captions)")
    return np.stack(frames), np.stack(tags)


def _read_image(path: str, size: int) -> np.ndarray:
    """A still as the data pipeline makes it (`clip_preprocess`), a `size` square."""
    frames_lib.check_media_file(path)
    try:
        with Image.open(path) as image:
            return frames_lib.clip_preprocess(image, size)
    except OSError as e:
        raise SkipRecord("corrupt_media", f"{path}: {e}") from e


class Tagger(nnx.Module):
    """The Valley model's ViT (shared, not copied) and a linear head on its pooled tokens."""

    def __init__(self, model, *, rngs: nnx.Rngs):
        self.vision = model.vision
        self.normalize = model.normalize
        self.head = nnx.Linear(2 * model.cfg.vision.width, len(TAGS), rngs=rngs)

    def __call__(self, images):
        tokens = self.vision.encode(self.normalize(self.vision.patchify(images)))
        pooled = jnp.concatenate([tokens.mean(1), tokens.max(1)], axis=-1)
        return self.head(pooled.astype(jnp.float32))


def pretrain(model, frames: np.ndarray, tags: np.ndarray, *, steps: int, batch_size: int = 64,
             lr: float = 1e-3, seed: int = 0, log_every: int = 250) -> dict:
    """Trains `model.vision` in place to tag `frames` (random crops of `image_size` from the
    larger frames; AdamW, warm-up then cosine). The last tenth of the frames is held out.
    Returns the held-out tag accuracy and the share of frames whose tags are all right."""
    size = model.cfg.vision.image_size
    n = len(frames)
    if frames.shape[1] < size:
        raise ValueError(f"frames of {frames.shape[1]} px cannot be cropped to {size}")
    held = max(1, n // 10)
    train_n = n - held
    tagger = Tagger(model, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 30), max(2, steps))
    optimizer = nnx.Optimizer(tagger, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def train_step(tagger, optimizer, images, labels):
        def loss_fn(tagger):
            return optax.sigmoid_binary_cross_entropy(tagger(images), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(tagger)
        optimizer.update(tagger, grads)
        return loss

    predict = nnx.jit(lambda tagger, images: tagger(images) > 0)
    offset = (frames.shape[1] - size) // 2

    def held_out() -> dict:
        images = frames[train_n:, offset:offset + size, offset:offset + size]
        right = np.concatenate([np.asarray(predict(tagger, images[i:i + 256]))
                                for i in range(0, held, 256)]) == (tags[train_n:] > 0)
        return {"tag_accuracy": float(right.mean()), "all_tags_right": float(right.all(1).mean())}

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = rng.integers(0, train_n, batch_size)
        y, x = rng.integers(0, frames.shape[1] - size + 1, 2)
        loss = train_step(tagger, optimizer, frames[rows, y:y + size, x:x + size], tags[rows])
        if step % log_every == 0 or step == steps:
            log.info("vision pretraining step %d/%d loss %.4f held-out %s (%.0f s)", step, steps,
                     float(loss), held_out(), time.perf_counter() - start)
    return held_out()
