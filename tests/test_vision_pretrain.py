"""The demo's vision pretraining (valley_jax/vision_pretrain.py): caption tags, where each colour
is, a ViT that learns both while nothing else in the model moves, and the trainer's WORKDIR/init
made once."""

import dataclasses
import json
import os
import subprocess

import numpy as np
from flax import nnx

from valley_jax import checkpoint, hf, vision_pretrain
from valley_jax.config import preset
from valley_jax.data import synthetic
from valley_jax.data.config import DataConfig, DatasetSpec
from valley_jax.layers import Policy
from valley_jax.valley import Valley

from test_train import ROOT, env, final_params, train_cmd


def tags_named(tags: np.ndarray) -> list[str]:
    return [vision_pretrain.TAGS[i] for i in np.flatnonzero(tags)]


def test_caption_tags_are_the_colour_shape_pairs_named():
    assert len(vision_pretrain.TAGS) == 18
    video = "a red square moves left, then a cyan triangle moves up"
    assert tags_named(vision_pretrain.caption_tags(video)) == ["red square", "cyan triangle"]
    assert tags_named(vision_pretrain.caption_tags("a green circle and a blue square")) == [
        "green circle", "blue square"]
    assert not vision_pretrain.caption_tags("a square moves left").any()


def test_colour_layout_finds_each_colour_where_it_is_drawn():
    # A red square that moves right by 20 px between frames 1 and 3; a blue circle from frame 2.
    square = synthetic.Sprite("red", "square", 20, 10, 30, "right", 20, 0, 1, 3)
    circle = synthetic.Sprite("blue", "circle", 16, 40, 4, "up", 0, 2, 1, 3)
    scene = synthetic.Scene((square, circle), frames=4, size=64, background=100, noise=6,
                            noise_seed=0)
    present, centres = vision_pretrain.colour_layout(synthetic.render(scene))
    red, blue = list(synthetic.COLOURS).index("red"), list(synthetic.COLOURS).index("blue")
    expected = np.zeros((4, 6), np.float32)
    expected[:, red], expected[2:, blue] = 1, 1
    np.testing.assert_array_equal(present, expected)
    # Centres: (corner + size / 2) / 64 * 2 - 1; the square is at x 10, 10, 20, 30.
    np.testing.assert_allclose(centres[:, red], [[-0.375, 0.25], [-0.375, 0.25], [-0.0625, 0.25],
                                                 [0.25, 0.25]], atol=1e-6)
    np.testing.assert_allclose(centres[:, blue], [[0, 0], [0, 0], [0.5, -0.625], [0.5, -0.625]],
                               atol=1e-6)
    assert not centres[:, [c for c in range(6) if c not in (red, blue)]].any()
    # A frame keeps the caption's tags of the colours in it: no blue circle before frame 2.
    tags = vision_pretrain.caption_tags("a red square moves right, then a blue circle moves up")
    assert tags_named(vision_pretrain.frame_tags(tags, present[0])) == ["red square"]
    assert tags_named(vision_pretrain.frame_tags(tags, present[3])) == ["red square", "blue circle"]


def quarter_covered(sprite: synthetic.Sprite, t: int) -> np.ndarray:
    """bool [4, 4]: the 16-px patches of a 64-px frame t that the sprite's own mask covers a
    quarter of (none before it appears)."""
    canvas = np.zeros((64, 64), bool)
    if t >= sprite.appear:
        x, y = sprite.corner(t)
        canvas[y:y + sprite.size, x:x + sprite.size] = synthetic._shape_mask(sprite.shape,
                                                                            sprite.size)
    return canvas.reshape(4, 16, 4, 16).sum((1, 3)) * 4 >= 256


def test_patch_shapes_label_each_patch_with_the_shape_covering_it():
    # 64 px in 16-px patches; a red square, a blue circle from frame 2 and a green circle the
    # caption does not name (so no label can be given it).
    square = synthetic.Sprite("red", "square", 20, 10, 30, "right", 20, 0, 1, 3)
    circle = synthetic.Sprite("blue", "circle", 16, 40, 4, "up", 0, 2, 1, 3)
    untagged = synthetic.Sprite("green", "circle", 12, 2, 2, "up", 0, 0, 1, 3)
    scene = synthetic.Scene((square, circle, untagged), frames=4, size=64, background=100,
                            noise=6, noise_seed=0)
    frames = synthetic.render(scene)
    present, _ = vision_pretrain.colour_layout(frames)
    caption = vision_pretrain.caption_tags("a red square moves right, then a blue circle moves up")
    tags = np.stack([vision_pretrain.frame_tags(caption, p) for p in present])
    ids = vision_pretrain.palette_ids(frames)
    labels = vision_pretrain.patch_shapes(ids, tags, 16)
    # Expected from the sprites' own masks: a patch takes a named sprite's shape where that
    # sprite covers at least a quarter of it.
    expected = np.zeros((4, 4, 4), np.int32)
    for t in range(4):
        for sprite in (square, circle):
            expected[t][quarter_covered(sprite, t)] = 1 + synthetic.SHAPES.index(sprite.shape)
    np.testing.assert_array_equal(labels, expected)
    assert (labels[0] == 1).sum() == 2 and not (labels[:2] == 2).any() and (labels[2:] == 2).any()
    # Colour labels need no caption: the green circle's patch has its colour and no shape.
    colours = vision_pretrain.patch_colours(ids, 16)
    expected = np.zeros((4, 4, 4), np.int32)
    for t in range(4):
        for sprite in (square, circle, untagged):
            covered = quarter_covered(sprite, t)
            assert not expected[t][covered].any()  # the sprites share no patch
            expected[t][covered] = 1 + list(synthetic.COLOURS).index(sprite.colour)
    np.testing.assert_array_equal(colours, expected)
    green = 1 + list(synthetic.COLOURS).index("green")
    assert colours[0, 0, 0] == green and labels[0, 0, 0] == 0


def tiny_model(seed: int = 0) -> Valley:
    cfg = preset("demo")
    vision = dataclasses.replace(cfg.vision, image_size=28, depth=2)
    return Valley(dataclasses.replace(cfg, vision=vision), Policy(), rngs=nnx.Rngs(seed))


def block_frames(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32-px frames, each with one palette-coloured block of one of two shapes (a full square or
    its lower-left triangle) somewhere on grey, and its tag."""
    rng = np.random.default_rng(seed)
    colours = list(synthetic.COLOURS)
    frames = np.full((n, 32, 32, 3), 128, np.uint8)
    tags = np.zeros((n, len(vision_pretrain.TAGS)), np.float32)
    tri = np.tril(np.ones((12, 12), bool))
    for i in range(n):
        colour, shape = colours[rng.integers(6)], ("square", "triangle")[rng.integers(2)]
        y, x = rng.integers(0, 20, 2)
        mask = np.ones((12, 12), bool) if shape == "square" else tri
        frames[i, y:y + 12, x:x + 12][mask] = synthetic.COLOURS[colour]
        tags[i, vision_pretrain.TAGS.index(f"{colour} {shape}")] = 1
    return frames, tags


def test_pretraining_learns_the_tags_and_moves_only_the_vit():
    model = tiny_model()
    before = hf.get_flat(model)
    frames, tags = block_frames(400, seed=0)
    labels = (tags, *vision_pretrain.colour_layout(frames))
    untrained = vision_pretrain.pretrain(tiny_model(), frames, *labels, steps=0, lr=3e-3)
    result = vision_pretrain.pretrain(model, frames, *labels, steps=900, batch_size=32, lr=3e-3)
    after = hf.get_flat(model)
    assert set(after) == set(before)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed and all(p[0] == "vision" for p in changed)
    # Held out (the last 40 frames): 12 tags of 18 are ever on; all of a frame's tags right.
    assert untrained["all_tags_right"] < 0.1
    assert result["tag_accuracy"] > 0.98 and result["all_tags_right"] >= 0.8
    # The class token says which colours are in the frame and where: closer than a guess of the
    # mean centre (these 28-px crops are 2 x 2 patches, so coarsely).
    held = frames[-40:, 2:30, 2:30]
    present, centres = vision_pretrain.colour_layout(held)
    on = present > 0
    guess = np.linalg.norm(centres[on] - centres[on].mean(0), axis=-1).mean() / 2
    assert untrained["presence_right"] < 0.1 and result["presence_right"] >= 0.95
    assert result["centre_error"] < 0.6 * guess < untrained["centre_error"]
    # So does the mean of the patch tokens (what Valley's temporal modules average over time).
    assert untrained["mean_patch_presence_right"] < 0.1
    assert result["mean_patch_presence_right"] >= 0.95
    assert result["mean_patch_centre_error"] < 0.6 * guess < untrained["mean_patch_centre_error"]
    # Each patch a block covers a quarter of says which shape it is part of (2 shapes here).
    assert untrained["patch_shape_right"] < 0.5 and result["patch_shape_right"] >= 0.85

    assert "patch_colour_right" not in result  # no colour head unless asked for


def test_pretraining_can_teach_each_patch_its_colour():
    frames, tags = block_frames(400, seed=1)
    labels = (tags, *vision_pretrain.colour_layout(frames))
    untrained = vision_pretrain.pretrain(tiny_model(), frames, *labels, steps=0, lr=3e-3,
                                         patch_colour_weight=0.3)
    result = vision_pretrain.pretrain(tiny_model(), frames, *labels, steps=300, batch_size=32,
                                      lr=3e-3, patch_colour_weight=0.3)
    # Of the held-out patches a block covers a quarter of, the share whose colour (1 of 6) is
    # read right off the patch token.
    assert untrained["patch_colour_right"] < 0.4 and result["patch_colour_right"] >= 0.95


def test_trainer_pretrains_the_vit_once_into_workdir_init(tmp_path):
    workdir = str(tmp_path / "run")
    cmd = train_cmd(workdir, "--config.init.vision_pretrain_steps=20", "--config.total_steps=4")
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "vision pretraining step 20/20" in log and "vision pretraining done" in log
    init = hf.get_flat(checkpoint.load_model(os.path.join(workdir, "init")))
    final = final_params(workdir)
    random = hf.get_flat(Valley(checkpoint.load_config(os.path.join(workdir, "init")), Policy(),
                                rngs=nnx.Rngs(0)))
    vision = [p for p in init if p[0] == "vision"]
    # Stage 1 keeps the ViT frozen: the model ends with the pretrained ViT, not the random one.
    assert all(np.array_equal(final[p], init[p]) for p in vision)
    assert any(not np.array_equal(init[p], random[p]) for p in vision)
    # Everything else in init is the random start (same seed).
    assert all(np.array_equal(init[p], random[p]) for p in init if p[0] != "vision")
    # A rerun resumes (here: at the end) without pretraining again.
    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "vision pretraining" not in again.stdout + again.stderr


def test_tagged_frames_reads_records_in_order_and_counts_unreadable_ones(tmp_path, monkeypatch,
                                                                        caplog):
    root = tmp_path / "world"
    synthetic.generate(root, seed=2, size=64, frames=8, num_train=12)
    records = json.loads((root / "stage1.json").read_text())
    broken = next(i for i, r in enumerate(records) if "video" in r)
    (root / records[broken]["video"]).write_bytes(b"not a video")
    cfg = DataConfig(datasets=(DatasetSpec(path=str(root / "stage1.json")),), tokenizer_path="",
                     num_frames=4,
                     image_size=56, resize_size=64, num_patches=16, shuffle=False,
                     num_epochs=1, num_workers=0)
    with caplog.at_level("WARNING"):
        two = vision_pretrain.tagged_frames(str(root / "stage1.json"), str(root), cfg)
    assert f"skips record {records[broken]['id']}" in caplog.text
    assert "skipped 1 of 12 records" in caplog.text
    monkeypatch.setattr(vision_pretrain, "READ_THREADS", 1)
    one = vision_pretrain.tagged_frames(str(root / "stage1.json"), str(root), cfg)
    frames, tags, present, centres, record_of = two
    assert all(np.array_equal(a, b) for a, b in zip(two, one, strict=True))
    # Every other record, in order: 4 frames of a video, 1 of a still.
    expected = [i for i, r in enumerate(records) if i != broken
                for _ in range(4 if "video" in r else 1)]
    assert record_of.tolist() == expected
    assert frames.shape == (len(expected), 64, 64, 3) and frames.dtype == np.uint8
