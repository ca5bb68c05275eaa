"""Pixels: which video frames are sampled, how frames and images become 224 x 224 RGB uint8.

Video follows the reference's `load_video` (decord, short side to 256, centre crop 224); images
follow transformers' `CLIPImageProcessor` for CLIP-L/14 (short side to 224 bicubic, centre crop).
Nothing is normalised here: the model does that on device, so uint8 travels (4x fewer bytes).
"""

import collections
import os

import cv2
import decord
import numpy as np
from PIL import Image

from valley_jax.data.config import DataConfig
from valley_jax.data.skips import SkipRecord

_CV2_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}

# Decoding errors surface as decord's or PIL's own exceptions; OSError covers truncated files.
_DECODE_ERRORS = (decord.DECORDError, RuntimeError, OSError, ValueError, Image.DecompressionBombError)


def sample_frame_indices(
    video_length: int, num_frames: int, frame_mode: str, avg_fps: float = 0.0, fps_sample_rate: float = 0.5
) -> np.ndarray:
    """Frame indices the reference samples from a video of `video_length` frames.

    fixed: `linspace(0, len - 1, num_frames)` truncated to int, first and last frame included;
    short videos repeat frames, so exactly num_frames come back.
    fps: every `int(round(avg_fps) / fps_sample_rate)`-th frame from 0, at most num_frames of them.
    """
    if frame_mode == "fixed":
        return np.linspace(0, video_length - 1, num_frames).astype(np.int64)
    if frame_mode == "fps":
        stride = max(1, int(round(avg_fps) / fps_sample_rate))
        return np.arange(0, video_length, stride, dtype=np.int64)[:num_frames]
    raise ValueError(f"unknown frame_mode {frame_mode!r}")


def check_media_file(path: str) -> None:
    if not os.path.isfile(path):
        raise SkipRecord("missing_file", path)
    if os.path.getsize(path) == 0:
        raise SkipRecord("empty_file", path)


class VideoFile:
    """An opened video: its length and frame rate are known before any frame is decoded, so the
    number of sampled frames (and with it the token count) is known before the costly decode."""

    def __init__(self, path: str):
        check_media_file(path)
        try:
            # One decoding thread per reader: parallelism comes from the loader's worker processes.
            self._reader = decord.VideoReader(path, num_threads=1, ctx=decord.cpu(0))
            self.length = len(self._reader)
            self.avg_fps = float(self._reader.get_avg_fps())
        except _DECODE_ERRORS as e:
            raise SkipRecord("corrupt_media", f"{path}: {e}") from e
        if self.length < 1:
            raise SkipRecord("corrupt_media", f"{path}: no frames")
        self.path = path

    def frame_indices(self, num_frames: int, frame_mode: str, fps_sample_rate: float) -> np.ndarray:
        return sample_frame_indices(self.length, num_frames, frame_mode, self.avg_fps, fps_sample_rate)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] RGB, at the video's own size."""
        try:
            return self._reader.get_batch(list(indices)).asnumpy()
        except _DECODE_ERRORS as e:
            raise SkipRecord("corrupt_media", f"{self.path}: {e}") from e


def _reference_resize_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side set to `short_side`, the long side truncated as the
    reference's `get_resize_sizes` does (int(), not round())."""
    if width < height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def resize_and_center_crop(frames: np.ndarray, resize_size: int, crop_size: int, interpolation: str,
                           rng: np.random.Generator | None = None) -> np.ndarray:
    """Video frames [N, H, W, 3] -> [N, crop, crop, 3]: short side to `resize_size` with cv2, then
    the reference's centre crop (offset `int(round((size - crop) / 2))`, Python's round), or with
    `rng` a crop at an offset drawn uniformly, the same for every frame."""
    height, width = frames.shape[1:3]
    if min(height, width) != resize_size:
        new_height, new_width = _reference_resize_size(height, width, resize_size)
        flag = _CV2_INTERPOLATION[interpolation]
        frames = np.stack([cv2.resize(f, (new_width, new_height), interpolation=flag) for f in frames])
        height, width = new_height, new_width
    if rng is None:
        top = int(round((height - crop_size) / 2.0))
        left = int(round((width - crop_size) / 2.0))
    else:
        top = int(rng.integers(0, height - crop_size + 1))
        left = int(rng.integers(0, width - crop_size + 1))
    return np.ascontiguousarray(frames[:, top : top + crop_size, left : left + crop_size])


def load_video_frames(video: VideoFile, indices: np.ndarray, config: DataConfig,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Sampled frames of an opened video as uint8 [len(indices), image_size, image_size, 3];
    cropped at random when `config.random_crop` (then `rng` is required)."""
    frames = video.read(indices)
    if min(frames.shape[1:3]) < config.min_media_side:
        raise SkipRecord("media_too_small", f"{video.path}: {frames.shape[2]}x{frames.shape[1]}")
    if config.random_crop and rng is None:
        raise ValueError("random_crop needs a random generator")
    return resize_and_center_crop(frames, config.resize_size, config.image_size, config.resize_interpolation,
                                  rng if config.random_crop else None)


class FrameCache:
    """A video's sampled, resized and cropped frames, kept by file for its next epoch.

    Bounded in bytes, least recently used out first; a file is known by its path, size and
    modification time, so a file replaced during the run is decoded anew. Each process keeps its
    own (the loader's workers are separate processes). Decoding is most of what a record costs
    (the demo's: ~4 of 4.5 ms), and on a small machine the workers' decoding slows the train
    step beside it (BENCHMARKS.md, "Data loader")."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: collections.OrderedDict = collections.OrderedDict()

    @staticmethod
    def key(path: str):
        try:
            stat = os.stat(path)
        except OSError:
            return None  # the reader reports it
        return path, stat.st_size, stat.st_mtime_ns

    def get(self, key) -> np.ndarray | None:
        frames = self._items.get(key) if key is not None else None
        if frames is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return frames

    def put(self, key, frames: np.ndarray) -> None:
        if key is None or frames.nbytes > self.max_bytes or key in self._items:
            return
        frames = frames.copy()
        frames.flags.writeable = False
        self._items[key] = frames
        self.bytes += frames.nbytes
        while self.bytes > self.max_bytes:
            self.bytes -= self._items.popitem(last=False)[1].nbytes


def _to_rgb(image: Image.Image) -> Image.Image:
    """As transformers' `convert_to_rgb`: transparency is composited onto white, grey is replicated."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def clip_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3] exactly as `CLIPImageProcessor` (CLIP-L/14) makes it before rescaling.

    Short side to `size` (long side truncated, as transformers' `get_resize_output_image_size`),
    PIL bicubic without reducing_gap, then a centre crop with floor offsets.
    """
    image = _to_rgb(image)
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    image = image.resize((new_width, new_height), resample=Image.BICUBIC, reducing_gap=None)
    top = (new_height - size) // 2
    left = (new_width - size) // 2
    return np.asarray(image)[top : top + size, left : left + size].copy()


def load_image(path: str, config: DataConfig) -> np.ndarray:
    check_media_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            if min(image.size) < config.min_media_side:
                raise SkipRecord("media_too_small", f"{path}: {image.size[0]}x{image.size[1]}")
            return clip_preprocess(image, config.image_size)
    except _DECODE_ERRORS as e:
        raise SkipRecord("corrupt_media", f"{path}: {e}") from e


def encode_frame(frame: np.ndarray, frame_format: str, jpeg_quality: int = 95) -> bytes:
    """One RGB uint8 frame as JPEG or (lossless) PNG bytes, for the ArrayRecord files."""
    extension = {"jpeg": ".jpg", "png": ".png"}[frame_format]
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if frame_format == "jpeg" else []
    ok, encoded = cv2.imencode(extension, np.ascontiguousarray(frame[..., ::-1]), params)
    if not ok:
        raise ValueError(f"cv2 could not encode a {frame.shape} frame as {frame_format}")
    return encoded.tobytes()


def decode_frame(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("cv2 could not decode a stored frame")
    return bgr[..., ::-1]
