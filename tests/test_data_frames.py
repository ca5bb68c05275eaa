"""Pixels: CLIP image preprocessing, the spec's frame sampling, the reference's resize and crop."""

import cv2
import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from test_data_fixtures import data_config, frame_value, make_image, make_video
from valley_jax.data import frames as frames_lib
from valley_jax.data.config import DatasetSpec
from valley_jax.data.skips import SkipRecord

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def pixel_config(**overrides):
    return data_config("unused", [DatasetSpec("unused.json")], **overrides)


@pytest.fixture(scope="module")
def clip_processor():
    # transformers' CLIPImageProcessor for CLIP-L/14, built locally. Its PIL backend is what
    # `CLIPImageProcessor` resolves to without torchvision, and what the reference ran.
    return CLIPImageProcessorPil(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=Image.BICUBIC,
        image_mean=CLIP_MEAN.tolist(),
        image_std=CLIP_STD.tolist(),
    )


@pytest.mark.parametrize(
    "width, height, mode",
    [(320, 240, "RGB"), (201, 301, "RGB"), (224, 224, "RGB"), (57, 31, "RGB"), (150, 97, "L"), (99, 130, "RGBA"),
     (120, 80, "P"), (1000, 60, "RGB")],
)
def test_image_pixels_equal_clip_image_processor(tmp_path, clip_processor, width, height, mode):
    path = make_image(str(tmp_path / "images" / f"x.{'jpg' if mode in ('RGB', 'L') else 'png'}"), width, height, mode)
    ours = frames_lib.load_image(path, pixel_config())

    with Image.open(path) as image:
        normalised = clip_processor(images=image, return_tensors="np")["pixel_values"][0]
    # Undo rescale and normalisation: the processor's pixels in [0, 255], channels last.
    theirs = (normalised.transpose(1, 2, 0) * CLIP_STD + CLIP_MEAN) * 255.0
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    # Within 1/255 is the requirement; the pixels are in fact identical (float rounding only).
    assert np.abs(ours.astype(np.float64) - theirs).max() < 0.01


@pytest.mark.parametrize(
    "video_length, expected",
    [
        (1, [0, 0, 0, 0, 0, 0, 0, 0]),
        (3, [0, 0, 0, 0, 1, 1, 1, 2]),
        (8, [0, 1, 2, 3, 4, 5, 6, 7]),
        (10, [0, 1, 2, 3, 5, 6, 7, 9]),
        (37, [0, 5, 10, 15, 20, 25, 30, 36]),
    ],
)
def test_fixed_mode_indices_are_the_specs_linspace(video_length, expected):
    indices = frames_lib.sample_frame_indices(video_length, 8, "fixed")
    assert indices.tolist() == expected
    assert indices.tolist() == np.linspace(0, video_length - 1, 8).astype(int).tolist()


@pytest.mark.parametrize(
    "video_length, avg_fps, num_frames, expected",
    [
        (45, 10.0, 8, [0, 20, 40]),  # every round(10) / 0.5 = 20 frames
        (45, 10.0, 2, [0, 20]),  # capped at the configured count
        (30, 2.4, 8, [0, 4, 8, 12, 16, 20, 24, 28]),  # round(2.4) = 2 -> every 4
        (5, 0.3, 3, [0, 1, 2]),  # round(0.3) = 0: stride clamped to 1
    ],
)
def test_fps_mode_indices(video_length, avg_fps, num_frames, expected):
    assert frames_lib.sample_frame_indices(video_length, num_frames, "fps", avg_fps).tolist() == expected


@pytest.mark.parametrize("video_length", [2, 5, 11])
def test_decoded_frames_are_the_sampled_ones(tmp_path, video_length):
    """Fewer frames than requested included: frame i of the test videos has grey level
    frame_value(i), read back in a corner that the moving square never reaches."""
    config = pixel_config(num_frames=8)
    video = frames_lib.VideoFile(make_video(str(tmp_path / "v.mp4"), video_length))
    indices = video.frame_indices(8, "fixed", 0.5)
    frames = frames_lib.load_video_frames(video, indices, config)
    assert frames.shape == (8, 224, 224, 3)
    corner_levels = frames[:, -20:, -20:].reshape(8, -1).mean(axis=1)
    np.testing.assert_allclose(corner_levels, [frame_value(i) for i in indices], atol=3)


def test_fps_mode_reads_every_second_frame_pair(tmp_path):
    video = frames_lib.VideoFile(make_video(str(tmp_path / "v.mp4"), 45, fps=10))
    indices = video.frame_indices(4, "fps", 0.5)
    assert indices.tolist() == [0, 20, 40]
    frames = frames_lib.load_video_frames(video, indices, pixel_config())
    np.testing.assert_allclose(frames[:, -20:, -20:].reshape(3, -1).mean(axis=1), [12, 412 % 256, 812 % 256], atol=3)


def test_video_resize_and_crop_follow_the_reference(tmp_path):
    """96x64 -> short side 256 with cv2 bilinear: 384x256; crop offsets (80, 16)."""
    video = frames_lib.VideoFile(make_video(str(tmp_path / "v.mp4"), 4, width=96, height=64))
    raw = video.read(np.array([2]))
    expected = cv2.resize(raw[0], (384, 256), interpolation=cv2.INTER_LINEAR)[16:240, 80:304]
    np.testing.assert_array_equal(frames_lib.load_video_frames(video, np.array([2]), pixel_config())[0], expected)

    nearest = cv2.resize(raw[0], (384, 256), interpolation=cv2.INTER_NEAREST)[16:240, 80:304]
    ours = frames_lib.load_video_frames(video, np.array([2]), pixel_config(resize_interpolation="nearest"))[0]
    np.testing.assert_array_equal(ours, nearest)


def test_odd_sized_video(tmp_path):
    """97x61: short side to 256 makes it 407x256 (int(407.08)); the crop starts at column
    round(91.5) = 92 and row 16."""
    video = frames_lib.VideoFile(make_video(str(tmp_path / "odd.mp4"), 6, width=97, height=61))
    indices = video.frame_indices(8, "fixed", 0.5)
    raw = video.read(indices)
    assert raw.shape == (8, 61, 97, 3)
    ours = frames_lib.load_video_frames(video, indices, pixel_config())
    expected = np.stack([cv2.resize(f, (407, 256), interpolation=cv2.INTER_LINEAR)[16:240, 92:316] for f in raw])
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_allclose(ours[:, -20:, -20:].reshape(8, -1).mean(axis=1), [frame_value(i) for i in indices], atol=3)


def test_crop_offset_rounds_like_the_reference():
    """455 - 224 = 231 columns to trim: Python's round(115.5) = 116 on the left (transformers' floor
    would give 115); a 256-high frame is not resized."""
    frames = np.random.default_rng(0).integers(0, 256, (2, 256, 455, 3), dtype=np.uint8)
    out = frames_lib.resize_and_center_crop(frames, 256, 224, "bilinear")
    np.testing.assert_array_equal(out, frames[:, 16:240, 116:340])


def test_random_crop_is_one_window_for_all_frames_drawn_uniformly():
    """455x256 frames cropped to 224: the offset is uniform over the 33 x 232 windows, the same
    for every frame of the clip; without a generator the crop stays centred."""
    rows, cols = np.mgrid[0:256, 0:455]
    position = np.stack([rows, cols % 256, cols // 256], -1).astype(np.uint8)  # pixel = its place
    frames = np.stack([position, position[::-1], position[:, ::-1]])
    rng = np.random.default_rng(7)
    tops, lefts = [], []
    for _ in range(2000):
        out = frames_lib.resize_and_center_crop(frames, 256, 224, "bilinear", rng)
        top, left = int(out[0, 0, 0, 0]), int(out[0, 0, 0, 1]) + 256 * int(out[0, 0, 0, 2])
        np.testing.assert_array_equal(out, frames[:, top:top + 224, left:left + 224])
        tops.append(top)
        lefts.append(left)
    assert (min(tops), max(tops), min(lefts), max(lefts)) == (0, 32, 0, 231)
    # Uniform: each third of the range is drawn about a third of the time (+-3.5 sigma).
    for values, span in ((tops, 33), (lefts, 232)):
        thirds = np.bincount(np.asarray(values) * 3 // span, minlength=3)
        assert np.all(np.abs(thirds - 2000 / 3) < 3.5 * np.sqrt(2000 * 2 / 9)), thirds
    np.testing.assert_array_equal(frames_lib.resize_and_center_crop(frames, 256, 224, "bilinear"),
                                  frames[:, 16:240, 116:340])


def test_long_thin_video_truncates_the_long_side_like_the_reference():
    """90x50: the long side becomes int(256 * 90 / 50) = 460 (not round: 460.8)."""
    frame = np.random.default_rng(1).integers(0, 256, (1, 50, 90, 3), dtype=np.uint8)
    expected = cv2.resize(frame[0], (460, 256), interpolation=cv2.INTER_LINEAR)[16:240, 118:342]
    np.testing.assert_array_equal(frames_lib.resize_and_center_crop(frame, 256, 224, "bilinear")[0], expected)


def test_broken_media_raise_the_right_skip(tmp_path):
    config = pixel_config()
    cases = {
        "missing_file": str(tmp_path / "nope.mp4"),
        "empty_file": str(tmp_path / "empty.mp4"),
        "corrupt_media": str(tmp_path / "corrupt.mp4"),
    }
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    for reason, path in cases.items():
        with pytest.raises(SkipRecord) as skip:
            frames_lib.VideoFile(path)
        assert skip.value.reason == reason

    with pytest.raises(SkipRecord) as skip:
        frames_lib.load_image(make_image(str(tmp_path / "dot.png"), 1, 1), config)
    assert skip.value.reason == "media_too_small"
    (tmp_path / "truncated.jpg").write_bytes(open(make_image(str(tmp_path / "ok.jpg"), 64, 64), "rb").read()[:200])
    with pytest.raises(SkipRecord) as skip:
        frames_lib.load_image(str(tmp_path / "truncated.jpg"), config)
    assert skip.value.reason == "corrupt_media"


def test_png_frames_round_trip_exactly():
    frame = np.random.default_rng(2).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(frames_lib.decode_frame(frames_lib.encode_frame(frame, "png")), frame)


def test_jpeg_frames_keep_rgb_order():
    frame = np.empty((224, 224, 3), np.uint8)
    frame[...] = [200, 30, 90]
    decoded = frames_lib.decode_frame(frames_lib.encode_frame(frame, "jpeg"))
    assert np.abs(decoded.astype(int) - frame).max() <= 3
