"""Reading Valley/LLaVA JSON and JSON-lines files, and resolving a record's media path.

A file that is not valid JSON stops the run before training starts, with the file and line. A
record that is valid JSON but unusable (no conversations, a path leaving its root, ...) is only
found, counted and skipped in the stream (see skips.py).
"""

import dataclasses
import json
import os

from valley_jax import tokens
from valley_jax.data.skips import SkipRecord

MEDIA_KINDS = ("video", "image")


def read_records(path: str) -> list[bytes]:
    """The records of a `.json` list or a `.jsonl` file, each re-serialised as compact JSON bytes.

    Bytes rather than dicts: a few hundred thousand records as Python dicts take several times the
    file's size, and every worker process receives its own copy of the list.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: malformed JSON line: {e.msg} (column {e.colno})") from e
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}:1: expected a JSON list of records, got {type(records).__name__}")
    return [json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() for record in records]


@dataclasses.dataclass(frozen=True)
class Record:
    """A record checked for shape: what to load and what was said."""

    id: str
    media_kind: str | None  # "video", "image", or None for text-only
    media_path: str  # relative to the root (with the record's `source` folder), "" when text-only
    conversations: tuple[tuple[str, str], ...]  # (from, value), as in the file


def record_id(record) -> str:
    """The record's `id` for logs; "?" when it has none."""
    return str(record.get("id", "?")) if isinstance(record, dict) else "?"


def parse_record(record) -> Record:
    """A decoded JSON record -> Record, or a SkipRecord saying what is wrong with it."""
    if not isinstance(record, dict):
        raise SkipRecord("bad_record", f"not a JSON object: {type(record).__name__}")

    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SkipRecord("no_conversations")
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SkipRecord("bad_conversation", "a turn without a text value")
        turns.append((str(turn.get("from", "")), turn["value"]))

    media_kinds = [kind for kind in MEDIA_KINDS if kind in record]
    if len(media_kinds) > 1:
        raise SkipRecord("bad_record", "both a video and an image")
    media_kind = media_kinds[0] if media_kinds else None
    media_path = ""
    if media_kind is not None:
        media_path = record[media_kind]
        if not isinstance(media_path, str) or not media_path:
            raise SkipRecord("bad_record", f"{media_kind} is not a path")
        # The reference appends .mp4 to video names given without an extension (webvid ids).
        if media_kind == "video" and not os.path.splitext(media_path)[1]:
            media_path += ".mp4"
        source = record.get("source")
        if source:
            if not isinstance(source, str):
                raise SkipRecord("bad_record", "source is not a folder name")
            media_path = os.path.join(source, media_path)
    return Record(record_id(record), media_kind, media_path, tuple(turns))


def resolve_media_path(root: str, relative_path: str) -> str:
    """`root/relative_path`, refused (a counted skip) if it leaves the root.

    The check is lexical (after `..` is folded), not through symlinks: folders linked into a root by
    whoever set the root up are trusted; record text is not.
    """
    root = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(root, relative_path))
    if os.path.commonpath([root, path]) != root:
        raise SkipRecord("path_escapes_root", relative_path)
    return path


def count_placeholders(text: str) -> int:
    return text.count(tokens.VIDEO) + text.count(tokens.IMAGE)
