"""The one description of an input pipeline: which data, how frames and tokens are made, how batched.

Plain frozen dataclasses so that the trainer's ml_collections config can fill them field by field.
"""

import dataclasses

FRAME_MODES = ("fixed", "fps")
RESIZE_INTERPOLATIONS = ("bilinear", "nearest")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the mixture.

    `path` is a Valley/LLaVA JSON list (`.json`) or JSON-lines file (`.jsonl`), or a folder written by
    `python -m valley_jax.data.prepare` (ArrayRecord; the roots are then unused). Media paths in a
    record resolve as `{root}/{source}/{path}` (`source` only when the record has one) and must stay
    inside the root.
    """

    path: str
    video_root: str = ""
    image_root: str = ""
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    datasets: tuple[DatasetSpec, ...]
    # A local Hugging Face tokenizer folder (`tokenizer.model` or `tokenizer.json`).
    tokenizer_path: str
    # T, the frames per sample: fixed mode samples exactly T; fps mode samples at most T.
    num_frames: int = 8
    frame_mode: str = "fixed"
    # fps mode: frames per second kept (the reference's `fps_number`); stride = round(fps) / this.
    fps_sample_rate: float = 0.5
    image_size: int = 224
    # Video frames: short side resized to this, then centre-cropped to image_size.
    resize_size: int = 256
    # "bilinear" follows the spec (cv2 INTER_LINEAR). The reference's transform, read closely, calls
    # `Resize(256)` whose default is nearest-neighbour: "nearest" reproduces that.
    resize_interpolation: str = "bilinear"
    # Training augmentation, off in the reference recipe: each video's crop is drawn at random
    # within the resized frame (one offset for all its frames, so motion is unchanged) instead of
    # centred. Images keep the CLIP processor's centre crop. Needs the media files (JSON
    # datasets): a prepared dataset stores frames already cropped.
    random_crop: bool = False
    # Each process keeps up to this many MB of decoded video frames (frames.FrameCache) and reuses
    # them in later epochs instead of decoding the file again; 0: none. Not with random_crop.
    frame_cache_mb: int = 0
    # Images or frames with a shorter side than this are skipped as broken (e.g. 1x1 pixels).
    min_media_side: int = 8
    max_length: int = 2048
    num_patches: int = 256
    # Sequence lengths a batch may be padded to (the smallest that fits); max_length is always one.
    length_buckets: tuple[int, ...] = ()
    # Global batch size; each of the jax processes loads batch_size // process_count of it.
    batch_size: int = 8
    seed: int = 0
    # Off only for evaluation or debugging: records then come in file order.
    shuffle: bool = True
    # None repeats the data forever (each epoch shuffled anew).
    num_epochs: int | None = None
    # Worker processes (grain mp_prefetch); 0 runs everything in the calling process.
    num_workers: int = 2
    worker_buffer_size: int = 2
    # Threads that read and transform records inside each worker.
    read_threads: int = 1

    def __post_init__(self):
        if not self.datasets:
            raise ValueError("DataConfig.datasets is empty")
        if self.frame_mode not in FRAME_MODES:
            raise ValueError(f"frame_mode must be one of {FRAME_MODES}, got {self.frame_mode!r}")
        if self.resize_interpolation not in RESIZE_INTERPOLATIONS:
            raise ValueError(
                f"resize_interpolation must be one of {RESIZE_INTERPOLATIONS}, got {self.resize_interpolation!r}"
            )
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size {self.resize_size} < image_size {self.image_size}: nothing to crop")
        if any(b > self.max_length for b in self.length_buckets):
            raise ValueError(f"length_buckets {self.length_buckets} exceed max_length {self.max_length}")
        if self.num_frames < 1:
            raise ValueError("num_frames must be >= 1")

    @property
    def buckets(self) -> tuple[int, ...]:
        """The padded lengths a batch can have, ascending, max_length last."""
        return tuple(sorted(set(self.length_buckets) | {self.max_length}))
