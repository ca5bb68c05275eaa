"""Why a record is skipped, and the marker a skipped record leaves in the stream.

A bad record never stops training: the transform that meets it returns a `Skipped` marker, the
stream drops the marker before batching (so batches stay full) and counts it by reason. The counts
reach the trainer through the loader (`Loader.skip_counts`).
"""

import dataclasses

import numpy as np

SKIP_REASONS = (
    "bad_record",  # not a JSON object, or a media field that is not a string
    "no_conversations",  # `conversations` missing, empty or not a list
    "bad_conversation",  # turns not alternating human/gpt from a human turn, or a non-text value
    "placeholder_without_media",  # `<video>`/`<image>` in the text but no `video`/`image` field
    "media_without_placeholder",  # a `video`/`image` field but no placeholder in any human turn
    "multiple_placeholders",  # more than one placeholder in a record
    "media_token_in_text",  # the text itself spells a media special token such as `<im_patch>`
    "path_escapes_root",  # the media path leaves its configured root
    "missing_file",
    "empty_file",
    "corrupt_media",  # decord or PIL cannot decode it
    "media_too_small",  # a side shorter than DataConfig.min_media_side
    "too_long",  # not even the first round fits in max_length
    "media_truncated",  # the rounds that fit do not hold the media block
)
REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}


class SkipRecord(Exception):
    """Raised while turning a record into an example; caught once, at the transform's boundary."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASON_INDEX:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What a transform returns in place of an example."""

    reason: str
    record_id: str
    detail: str


def empty_counts() -> np.ndarray:
    return np.zeros(len(SKIP_REASONS), np.int64)


def counts_to_dict(counts: np.ndarray) -> dict[str, int]:
    """Non-zero counts by reason name."""
    return {reason: int(n) for reason, n in zip(SKIP_REASONS, counts) if n}
