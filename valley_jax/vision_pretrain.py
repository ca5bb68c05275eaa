"""The CPU demo's stand-in for CLIP: its from-scratch ViT pretrained to tag and locate shapes.

Valley reads frames with a pretrained CLIP ViT-L/14 and keeps it frozen. The demo cannot
download CLIP, and a ViT that learns only through the LLM's answers learns which shape is which
colour slowly (held-out shape answers 0.55-0.70 after 3000 stage-2 steps; BENCHMARKS.md, "CPU
demo"), and its class token, which Valley gives the LLM once per frame, says nothing about where
the shapes are (probes in BENCHMARKS.md), where CLIP's does. So, when
`config.init.vision_pretrain_steps` is set (the demo's stage 1), the trainer first pretrains the
ViT on the training split's frames (the frames Valley samples from each clip, and each still),
through the features Valley uses (the selected layer's tokens):

- tags, from text: which colour-shape pairs the record's caption names (`caption_tags`: 6
  colours x 3 shapes), of those whose colour is in the frame, read from the patch tokens
  (mean- and max-pooled);
- layout, from the pixels (`colour_layout`): for each of the palette's colours, whether it is in
  the frame and the centre of its pixels, read from the class token, so that the LLM's frame
  tokens say where each shape is in each frame, as CLIP's class token does, and read again from
  the mean of the patch tokens: Valley's temporal transformer (v3) sees each patch position's
  tokens over the frames and adds their mean, so a colour's place in the patch tokens lets it
  turn two frames into which way that colour went, where the LLM, from class tokens, has to
  compare tokens of different frames itself (direction answers 0.69 -> 0.90 at seed 0;
  BENCHMARKS.md, "CPU demo", session 17);
- patch shapes, from both (`patch_shapes`): for each patch token, the shape of the tagged colour
  that covers a quarter of it, if any, so that a question naming a colour can find that colour's
  patches and read its shape (and which way and when it moves) off them;
- patch colours, from the pixels (`patch_colours`, when `patch_colour_weight` is set; the demo
  sets `config.init.vision_pretrain_colour_weight`): for each patch token, the palette colour
  that covers a quarter of it, so that a question naming a shape can find that shape's patches
  and read their colour off them (BENCHMARKS.md, "CPU demo", session 20).

Sigmoid cross-entropy for tags and presence, squared error for the centres of the colours present
(the layout terms, of both readouts, weighted by LAYOUT_WEIGHT), softmax cross-entropy for the
patch shapes (weighted by PATCH_WEIGHT) and colours; linear heads that are then thrown away. The
held-out tenth of the clips is scored to show what the tower learned. The result is saved as the
run's initial checkpoint (`WORKDIR/init`), so a resumed run does not pretrain again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from valley_jax.data import frames as frames_lib
from valley_jax.data.config import DataConfig
from valley_jax.data import synthetic
from valley_jax.data.skips import SkipRecord

log = logging.getLogger(__name__)

READ_THREADS = 2  # frames decoded side by side for the pretraining
TAGS = tuple(f"{colour} {shape}" for colour in synthetic.COLOURS for shape in synthetic.SHAPES)
_TAG = re.compile(r"\b(%s) (%s)\b" % ("|".join(synthetic.COLOURS), "|".join(synthetic.SHAPES)))
_PALETTE = np.asarray(list(synthetic.COLOURS.values()), np.int16)  # [6, 3]
# A pixel is of a palette colour when every channel is within this of it. The palette's colours
# are at least 140 apart and the grey backgrounds at least 80 from each of them, so coding noise
# and blended edges do not cross over.
COLOUR_TOLERANCE = 50
# A colour is present when at least this share of the frame has it (the smallest sprite, a
# triangle of 0.3 of the side, covers 4.5 %).
MIN_PRESENT = 0.005
# The tower is small (64 wide) and the two tasks compete for it: with the layout weighted as much
# as the tags, 2000 steps got all tags of a held-out frame right 0.49 of the time (0.998 without
# layout) and centres within 0.11 of the side; with 0.3, 0.81 and 0.12 (BENCHMARKS.md, "CPU demo").
LAYOUT_WEIGHT = 0.3
# Each patch token is also taught which shape it is part of (`patch_shapes`), so that the LLM can
# find a named colour's patches and read its shape off them.
PATCH_WEIGHT = 0.3


def caption_tags(caption: str) -> np.ndarray:
    """float32 [len(TAGS)]: 1 for each colour-shape pair the caption names."""
    tags = np.zeros(len(TAGS), np.float32)
    for colour, shape in _TAG.findall(caption):
        tags[TAGS.index(f"{colour} {shape}")] = 1
    return tags


@functools.cache
def _palette_lut() -> np.ndarray:
    """int8 [256, 256, 256]: the palette colour each RGB value is near, -1 for none. A lookup
    per pixel is ~5x faster than comparing every pixel with every colour (the ~5500 frames of
    the demo: ~8 s against ~45 s)."""
    lut = np.full((256, 256, 256), -1, np.int8)
    levels = np.arange(256)
    for c, rgb in enumerate(_PALETTE):
        lut[np.ix_(*(np.abs(levels - v) <= COLOUR_TOLERANCE for v in rgb))] = c
    return lut


def palette_ids(frames: np.ndarray) -> np.ndarray:
    """int8 [N, H, W]: the palette colour of each pixel of uint8 RGB frames [N, H, W, 3], -1
    for none."""
    lut = _palette_lut()
    return np.concatenate([lut[chunk[..., 0], chunk[..., 1], chunk[..., 2]]
                           for chunk in np.array_split(frames, max(1, len(frames) // 256))])


def colour_layout(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each palette colour is in uint8 RGB frames [N, H, W, 3].

    Returns presence float32 [N, 6] (1 where the colour covers at least MIN_PRESENT of the frame)
    and centres float32 [N, 6, 2]: (x, y) of the colour's pixels, -1 at the left / top edge, +1 at
    the right / bottom one, 0 where the colour is absent."""
    n, h, w, _ = frames.shape
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    count = np.zeros((n, len(_PALETTE)), np.float32)
    sums = np.zeros((n, len(_PALETTE), 2), np.float32)
    for i in range(0, n, 256):
        colour = palette_ids(frames[i:i + 256])  # [n, H, W]
        for c in range(len(_PALETTE)):
            mask = colour == c
            count[i:i + 256, c] = mask.sum((1, 2))
            sums[i:i + 256, c, 0] = mask.sum(1) @ xs
            sums[i:i + 256, c, 1] = mask.sum(2) @ ys
    present = count >= MIN_PRESENT * h * w
    centres = sums / np.maximum(count, 1)[..., None] * present[..., None]
    return present.astype(np.float32), centres.astype(np.float32)


def _patch_colours(ids: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """The palette colour with most pixels in each patch ([N, H/patch, W/patch]) of frames'
    palette colours (`palette_ids`: [N, H, W]; the first such colour on a tie), and whether it
    covers a quarter of the patch."""
    n, h, w = ids.shape
    gh, gw = h // patch, w // patch
    colour = ids[:, :gh * patch, :gw * patch].reshape(n, gh, patch, gw, patch)
    bins = 1 + len(synthetic.COLOURS)  # -1 (none) and the palette's colours
    # One count of (patch, colour) pairs rather than a pass over the pixels per colour.
    cell = np.arange(n * gh * gw, dtype=np.int32).reshape(n, gh, 1, gw, 1) * bins
    counts = np.bincount((cell + (colour + 1)).ravel(), minlength=n * gh * gw * bins)
    counts = counts.reshape(n, gh, gw, bins)[..., 1:]
    dominant = counts.argmax(-1)
    covered = np.take_along_axis(counts, dominant[..., None], -1)[..., 0] * 4 >= patch * patch
    return dominant, covered


def _shape_labels(dominant: np.ndarray, covered: np.ndarray, tags: np.ndarray) -> np.ndarray:
    n = len(dominant)
    pairs = tags.reshape(n, len(synthetic.COLOURS), len(synthetic.SHAPES))
    shape_of = np.where(pairs.any(-1), pairs.argmax(-1) + 1, 0)  # [N, 6]; 0: not tagged
    label = np.take_along_axis(shape_of, dominant.reshape(n, -1), 1).reshape(dominant.shape)
    return np.where(covered, label, 0).astype(np.int32)


def patch_shapes(ids: np.ndarray, tags: np.ndarray, patch: int) -> np.ndarray:
    """int32 [N, H/patch, W/patch]: which shape each patch of frames is part of, 1 + its index
    in `synthetic.SHAPES`, from the frames' palette colours (`palette_ids`: [N, H, W]) and tags
    [N, 18] (the caption names each colour's shape); 0 where no tagged colour covers a quarter
    of the patch."""
    return _shape_labels(*_patch_colours(ids, patch), tags)


def _colour_labels(dominant: np.ndarray, covered: np.ndarray) -> np.ndarray:
    return np.where(covered, dominant + 1, 0).astype(np.int32)


def patch_colours(ids: np.ndarray, patch: int) -> np.ndarray:
    """int32 [N, H/patch, W/patch]: the palette colour that covers a quarter of each patch of
    frames (`palette_ids`: [N, H, W]), 1 + its index in `synthetic.COLOURS`; 0 where none
    does."""
    return _colour_labels(*_patch_colours(ids, patch))


def frame_tags(tags: np.ndarray, present: np.ndarray) -> np.ndarray:
    """A caption's tags [18] kept for the colours present in a frame ([6]): a shape that has not
    appeared yet is not in the frame."""
    return (tags.reshape(len(synthetic.COLOURS), len(synthetic.SHAPES)) * present[:, None]).ravel()


def tagged_frames(records_path: str, root: str, config: DataConfig):
    """The frames of the records and their labels: uint8 frames [N, S, S, 3] (short side resized
    to S = `config.resize_size`, centre square), tags [N, 18], presence [N, 6], centres [N, 6, 2]
    and the index of each frame's record [N].

    Of each video record the frames the data pipeline samples (`config.num_frames`,
    `frame_mode`), of each image record the image. Records whose caption names no pair are left
    out, as are unreadable ones (counted and logged)."""
    size = config.resize_size
    with open(records_path) as f:
        records = json.load(f)
    tagged = [(i, record, caption_tags(record["conversations"][1]["value"]))
              for i, record in enumerate(records)]
    tagged = [(i, record, tag) for i, record, tag in tagged if tag.any()]

    def read(record):
        try:
            if "video" in record:
                video = frames_lib.VideoFile(os.path.join(root, record["video"]))
                indices = video.frame_indices(config.num_frames, config.frame_mode,
                                              config.fps_sample_rate)
                return frames_lib.resize_and_center_crop(video.read(indices), size, size,
                                                         config.resize_interpolation)
            return _read_image(os.path.join(root, record["image"]), size)[None]
        except SkipRecord as e:
            return e

    frames, tags, record_of, skipped = [], [], [], 0
    # Decoded on two threads (decord and the resize release the GIL), kept in record order.
    with ThreadPoolExecutor(READ_THREADS) as pool:
        reads = pool.map(read, [record for _, record, _ in tagged])
        for (i, record, tag), read_frames in zip(tagged, reads, strict=True):
            if isinstance(read_frames, SkipRecord):
                skipped += 1
                log.warning("vision pretraining skips record %s: %s", record.get("id"),
                            read_frames)
                continue
            frames.extend(read_frames)
            tags.extend([tag] * len(read_frames))
            record_of.extend([i] * len(read_frames))
    if skipped:
        log.warning("vision pretraining skipped %d of %d records", skipped, len(records))
    if not frames:
        raise ValueError(f"{records_path}: no record's caption names a colour and a shape "
                         f"(vision pretraining reads the synthetic world's captions)")
    frames = np.stack(frames)
    present, centres = colour_layout(frames)
    tags = np.stack([frame_tags(t, p) for t, p in zip(tags, present, strict=True)])
    return frames, tags, present, centres, np.asarray(record_of)


def _read_image(path: str, size: int) -> np.ndarray:
    """A still as the data pipeline makes it (`clip_preprocess`), a `size` square."""
    frames_lib.check_media_file(path)
    try:
        with Image.open(path) as image:
            return frames_lib.clip_preprocess(image, size)
    except OSError as e:
        raise SkipRecord("corrupt_media", f"{path}: {e}") from e


class Tagger(nnx.Module):
    """The Valley model's ViT (shared, not copied) and linear heads: on its pooled patch tokens
    (tags), on its class token and on the mean of its patch tokens (each: presence and centre of
    each colour), and on each patch token (its shape and, with `patch_colours`, its colour)."""

    def __init__(self, model, *, rngs: nnx.Rngs, patch_colours: bool = False):
        width, colours = model.cfg.vision.width, len(synthetic.COLOURS)
        self.vision = model.vision
        self.normalize = model.normalize
        self.head = nnx.Linear(2 * width, len(TAGS), rngs=rngs)
        self.cls_head = nnx.Linear(width, 3 * colours, rngs=rngs)
        self.patch_head = nnx.Linear(width, 1 + len(synthetic.SHAPES), rngs=rngs)
        self.mean_head = nnx.Linear(width, 3 * colours, rngs=rngs)
        # Made only when asked for, so that the other heads' initial values and the step's
        # arithmetic stay those the demo's figures were measured with.
        self.colour_head = nnx.Linear(width, 1 + colours, rngs=rngs) if patch_colours else None

    def __call__(self, images):
        """Logits of the tags [B, 18] (from the patches); the layout from the class token and
        from the mean patch token, each as logits of presence [B, 6] and centres [B, 6, 2]; and
        logits of each patch's shape [B, N, 4] (0: none); with a colour head, last, logits of
        each patch's colour [B, N, 7] (0: none)."""
        tokens = self.vision.encode(self.normalize(self.vision.patchify(images)))
        tokens = tokens.astype(jnp.float32)
        patches = tokens[:, 1:]
        pooled = self.head(jnp.concatenate([patches.mean(1), patches.max(1)], axis=-1))
        c = len(synthetic.COLOURS)

        def layout(out):
            return out[:, :c], out[:, c:].reshape(-1, c, 2)

        # The mean is written twice on purpose: XLA fuses each into its consumer, and one shared
        # mean rounds the step differently from the one the demo's figures were measured with.
        out = (pooled, layout(self.cls_head(tokens[:, 0])),
               layout(self.mean_head(patches.mean(1))), self.patch_head(patches))
        return out if self.colour_head is None else (*out, self.colour_head(patches))


def pretrain(model, frames: np.ndarray, tags: np.ndarray, present: np.ndarray,
             centres: np.ndarray, record_of: np.ndarray | None = None, *, steps: int,
             lr: float, batch_size: int = 64, seed: int = 0, log_every: int = 250,
             layout_weight: float = LAYOUT_WEIGHT, patch_weight: float = PATCH_WEIGHT,
             patch_colour_weight: float = 0.0) -> dict:
    """Trains `model.vision` in place on `frames` (random crops of `image_size` from the larger
    frames; AdamW at peak `lr`, warm-up then cosine; the trainer passes
    `config.init.vision_pretrain_lr`). The frames of the last tenth of the records are held out
    (`record_of`: each frame's record; by default each frame is its own).

    Returns, on the held-out frames: tag_accuracy and all_tags_right; from the class token,
    presence_right (all six colours' presence right) and centre_error (mean distance of a present
    colour's predicted centre from its true one, as a share of the frame's side); the same from
    the mean patch token (mean_patch_presence_right, mean_patch_centre_error); and
    patch_shape_right (of the patches a tagged colour covers a quarter of, the share whose shape
    is right) and, when `patch_colour_weight` teaches each patch token its colour too
    (`patch_colours`, softmax cross-entropy), patch_colour_right (of the patches a palette colour
    covers a quarter of, the share whose colour is right)."""
    size = model.cfg.vision.image_size
    if frames.shape[1] < size:
        raise ValueError(f"frames of {frames.shape[1]} px cannot be cropped to {size}")
    if record_of is None:
        record_of = np.arange(len(frames))
    records = np.unique(record_of)
    held_records = records[len(records) - max(1, len(records) // 10):]
    held = np.isin(record_of, held_records)
    train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
    margin = frames.shape[1] - size
    with_colours = patch_colour_weight > 0
    tagger = Tagger(model, rngs=nnx.Rngs(seed), patch_colours=with_colours)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 30), max(2, steps))
    optimizer = nnx.Optimizer(tagger, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)

    def crop_centres(centres, present, x, y):
        """Centres in a crop from (x, y): -1..1 over its `size` pixels."""
        pixels = (centres + 1) / 2 * frames.shape[1] - np.asarray([x, y], np.float32)
        return np.where(present[..., None] > 0, pixels / size * 2 - 1, 0).astype(np.float32)

    @nnx.jit
    def train_step(tagger, optimizer, images, tags, present, centres, shapes, colours):
        def loss_fn(tagger):
            pooled, (presence, where), (mean_presence, mean_where), patch_logits, *colour_logits = (
                tagger(images))
            bce = optax.sigmoid_binary_cross_entropy
            # The layout's terms of both readouts, the class token's and the mean patch token's.
            error = ((where - centres) ** 2).sum(-1) + ((mean_where - centres) ** 2).sum(-1)
            layout = (error * present).sum() / jnp.maximum(present.sum(), 1)
            layout = layout + bce(mean_presence, present).mean()
            xent = optax.softmax_cross_entropy_with_integer_labels
            loss = (bce(pooled, tags).mean() + patch_weight * xent(patch_logits, shapes).mean()
                    + layout_weight * (bce(presence, present).mean() + layout))
            if with_colours:
                loss = loss + patch_colour_weight * xent(colour_logits[0], colours).mean()
            return loss

        loss, grads = nnx.value_and_grad(loss_fn)(tagger)
        optimizer.update(tagger, grads)
        return loss

    predict = nnx.jit(lambda tagger, images: jax.tree.leaves(tagger(images)))
    offset = margin // 2
    patch = model.cfg.vision.patch_size
    ids = palette_ids(frames)  # once: the lookup is most of a step's labelling time
    held_dominant, held_covered = _patch_colours(
        ids[held_rows, offset:offset + size, offset:offset + size], patch)
    held_shapes = _shape_labels(held_dominant, held_covered, tags[held_rows])
    held_colours = _colour_labels(held_dominant, held_covered)

    def held_out() -> dict:
        outs = [predict(tagger, frames[held_rows[i:i + 256], offset:offset + size,
                                       offset:offset + size]) for i in range(0, len(held_rows), 256)]
        pooled, presence, where, mean_presence, mean_where, patch_logits, *colour_logits = (
            np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(len(outs[0])))
        truth, on = tags[held_rows] > 0, present[held_rows]
        shapes = held_shapes.reshape(len(held_rows), -1)
        on_shape = shapes > 0
        right = (pooled > 0) == truth
        true_centres = crop_centres(centres[held_rows], on, offset, offset)

        def presence_right(logits):
            return float(((logits > 0) == (on > 0)).all(1).mean())

        def centre_error(where):
            distance = np.sqrt(((where - true_centres) ** 2).sum(-1)) / 2  # share of the side
            return float((distance * on).sum() / max(on.sum(), 1))

        result = {"tag_accuracy": float(right.mean()),
                  "all_tags_right": float(right.all(1).mean()),
                  "presence_right": presence_right(presence),
                  "centre_error": centre_error(where),
                  "mean_patch_presence_right": presence_right(mean_presence),
                  "mean_patch_centre_error": centre_error(mean_where),
                  "patch_shape_right": float(
                      (patch_logits.argmax(-1) == shapes)[on_shape].mean())}
        if with_colours:
            colours = held_colours.reshape(len(held_rows), -1)
            result["patch_colour_right"] = float(
                (colour_logits[0].argmax(-1) == colours)[colours > 0].mean())
        return result

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = train_rows[rng.integers(0, len(train_rows), batch_size)]
        y, x = rng.integers(0, margin + 1, 2)
        dominant, covered = _patch_colours(ids[rows, y:y + size, x:x + size], patch)
        shapes = _shape_labels(dominant, covered, tags[rows]).reshape(len(rows), -1)
        colours = (_colour_labels(dominant, covered).reshape(len(rows), -1) if with_colours
                   else None)
        loss = train_step(tagger, optimizer, frames[rows, y:y + size, x:x + size], tags[rows],
                          present[rows], crop_centres(centres[rows], present[rows], x, y),
                          shapes, colours)
        if step % log_every == 0 or step == steps:
            log.info("vision pretraining step %d/%d loss %.4f held-out %s (%.0f s)", step, steps,
                     float(loss), held_out(), time.perf_counter() - start)
    return held_out()
