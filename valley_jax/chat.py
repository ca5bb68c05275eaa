"""Talk to a video or an image: `python -m valley_jax.chat`, and the `Session` API behind it.

    python -m valley_jax.chat --checkpoint CKPT --video clip.mp4 --query "What moves?" [--json]
    python -m valley_jax.chat --checkpoint CKPT --image photo.jpg      # interactive, multi-turn

CKPT is a valley_jax model checkpoint or a Hugging Face folder in the authors' layout
(`ValleyLlamaForCausalLM`), converted on the fly. From Python (the evaluation notebook):

    session = valley_jax.chat.load(CKPT)
    session.ask("What colour is the square?", video="clip.mp4")   # -> the cleaned answer
    session.ask("Which way does it move?")                        # same video, with history
    session.frames(video="clip.mp4")                              # uint8 [T, S, S, 3]

Prompts. By default, the training template v1 (see VALLEY_SPEC.md "Conversation template
v1"): `{SYSTEM_V1}\\n\\n### Human: {q1}\\n### Assistant: {a1}\\n### Human: {q2}\\n### Assistant:`,
answers cut at the next "###" (`generate.cut_at_stop`), as valley_jax.qa does. `legacy=True`
reproduces the authors' inference code instead (valley/model/valley_model.py `build_inputs` and
`process_response`): `{SYSTEM_INFERENCE}\\n\\n### Human: {q} \\n###`, earlier turns as
` Human: {q} \\n### Assistent: {a} \\n###` (their spelling), and their response clean-up.

A conversation is about one video or image: its placeholder (`<video>` / `<image>`, prepended to
the first question when missing) goes into the first human turn only, and every later prompt
re-reads the whole history with the same frames. Frames are loaded as training loads them
(valley_jax.data.frames), at the checkpoint's image size and number of frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from valley_jax import checkpoint, convert, generate, tokens
from valley_jax.data import frames as frames_lib
from valley_jax.data.config import DataConfig, DatasetSpec
from valley_jax.data.records import count_placeholders
from valley_jax.data.skips import SkipRecord
from valley_jax.data.text import format_v1, load_tokenizer
from valley_jax.layers import Policy

LEGACY_PREFIXES = ("###", "Assistant:", "Response:", "Valley:")  # process_response strips these


class ChatError(Exception):
    """A problem with what the user gave (media, question, length): reported as a message."""


# ---------------------------------------------------------------------------------------------
# Loading


def _read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ChatError(f"{path}: cannot read it: {err}") from None


def load(path, num_frames: int | None = None, *, dtype: str = "auto", system: str | None = None,
         legacy: bool = False) -> "Session":
    """A chat session on a valley_jax model checkpoint or an authors' Hugging Face folder
    (told apart by config.json: ours has `format`, theirs `architectures`).

    num_frames: frames sampled per video (default: the checkpoint's, 8 for the authors');
    dtype: 'float32', 'bfloat16' or 'auto' (bfloat16 on an accelerator, float32 on the CPU).
    An authors' folder is converted into a temporary checkpoint each time (as much disk as the
    weights); `python -m valley_jax.convert from-valley` once saves that.
    """
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ChatError(f"{path}: no config.json, so neither a valley_jax checkpoint nor a "
                        "Hugging Face model folder")
    meta = _read_json(config_path)
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype not in ("float32", "bfloat16"):
        raise ChatError(f"dtype {dtype!r}: choose auto, float32 or bfloat16")
    policy = Policy(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))

    def open_checkpoint(ckpt):
        tokenizer_dir = checkpoint.tokenizer_dir(ckpt)
        if tokenizer_dir is None:
            raise ChatError(f"{path}: has no tokenizer, which chat needs")
        return checkpoint.load_model(ckpt, policy), load_tokenizer(tokenizer_dir)

    if "format" in meta:
        model, tokenizer = open_checkpoint(path)
    elif "architectures" in meta:
        with tempfile.TemporaryDirectory(prefix="valley_chat_") as scratch:
            ckpt = os.path.join(scratch, "model")
            convert.from_valley(path, ckpt, num_frames=num_frames or 8)
            model, tokenizer = open_checkpoint(ckpt)
    else:
        raise ChatError(f"{config_path}: neither a valley_jax checkpoint (no `format`) nor a "
                        "Hugging Face model (no `architectures`)")
    return Session(model, tokenizer, num_frames=num_frames, system=system, legacy=legacy)


# ---------------------------------------------------------------------------------------------
# Media


@dataclasses.dataclass(frozen=True, eq=False)
class Media:
    kind: str  # "video" | "image"
    path: str  # absolute
    frames: np.ndarray  # uint8 [T, S, S, 3], what the model sees

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.path

    @property
    def placeholder(self) -> str:
        return tokens.VIDEO if self.kind == "video" else tokens.IMAGE


def resize_size_for(image_size: int) -> int:
    """Video frames' short side before the centre crop. Checkpoints do not record it; both run
    configs use the reference's ratio (256 for 224, 128 for the demo's 112)."""
    return round(image_size * 256 / 224)


# ---------------------------------------------------------------------------------------------
# Response clean-up, whole and while streaming


def clean_v1(text: str) -> str:
    return generate.cut_at_stop(text, tokens.SEP)


def clean_legacy(text: str) -> str:
    """The authors' `process_response`: strip leading "###", "Assistant:", "Response:",
    "Valley:" (repeatedly), then cut at the next "###"."""
    while True:
        before = len(text)
        text = text.strip()
        for prefix in LEGACY_PREFIXES:
            if text.startswith(prefix):
                text = text[len(prefix):].strip()
        if len(text) == before:
            break
    return text.split(tokens.SEP)[0].strip()


def shown_so_far(raw: str, clean: Callable[[str], str], prefixes: tuple[str, ...]) -> str:
    """The part of the answer that can be shown while `raw` (the decoded output so far) may
    still grow: the clean-up of `raw` without what could yet change meaning (a trailing "#" or
    "##" that may become the stop string, trailing whitespace, an unfinished UTF-8 character, or
    a beginning that may become a prefix the clean-up strips). It is always a prefix of the
    final answer, so streamed pieces never need taking back."""
    if tokens.SEP in raw:
        return clean(raw)
    for k in range(len(tokens.SEP) - 1, 0, -1):
        if raw.endswith(tokens.SEP[:k]):
            raw = raw[:-k]
            break
    text = clean(raw.rstrip("\ufffd"))
    if any(p.startswith(text) and p != text for p in prefixes):
        return ""
    return text


# ---------------------------------------------------------------------------------------------
# The session


@dataclasses.dataclass(frozen=True)
class Reply:
    """What the last `ask` did: its answer, the generated ids (up to and with the stop
    string, without EOS) and the ids of the prompt the model read."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]


def _notify_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Session:
    """A conversation with one model. `ask` answers and keeps the history; `reset` forgets it.

    Passing a video or image different from the conversation's starts a new conversation about
    it; passing the same one again (or none) continues. `last` holds the last `Reply`.
    """

    def __init__(self, model, tokenizer, *, num_frames: int | None = None,
                 system: str | None = None, legacy: bool = False,
                 notify: Callable[[str], None] = _notify_stderr):
        cfg = model.cfg
        self.model, self.tokenizer, self.legacy, self.notify = model, tokenizer, legacy, notify
        self.system = system if system is not None else (
            tokens.SYSTEM_INFERENCE if legacy else tokens.SYSTEM_V1)
        self.num_patches = cfg.vision.num_patches
        self.context = cfg.llm.max_position
        self.data_config = DataConfig(
            datasets=(DatasetSpec(path="chat"),), tokenizer_path="",
            num_frames=num_frames or cfg.num_frames, image_size=cfg.vision.image_size,
            resize_size=resize_size_for(cfg.vision.image_size), num_patches=self.num_patches)
        self.stop = generate.stop_on_strings(tokenizer, [tokens.SEP], cfg.llm.vocab_size)
        self.ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
            ("im_patch", tokens.IM_PATCH), ("vi_frame", tokens.VI_FRAME))}
        if (self.ids["im_patch"], self.ids["vi_frame"]) != (cfg.im_patch_id, cfg.vi_frame_id):
            raise ChatError(f"the tokenizer's {tokens.IM_PATCH}/{tokens.VI_FRAME} ids "
                            f"{self.ids['im_patch']}/{self.ids['vi_frame']} are not the model's "
                            f"{cfg.im_patch_id}/{cfg.vi_frame_id}")
        self._loaded: Media | None = None  # the last media read, so frames() then ask() reads once
        self.last: Reply | None = None
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation: history and media."""
        self.turns: list[tuple[str, str]] = []  # (question as asked, with its placeholder; answer)
        self.media: Media | None = None

    # Media ------------------------------------------------------------------------------------

    def _load_media(self, video, image) -> Media | None:
        if video is not None and image is not None:
            raise ChatError("give a video or an image, not both")
        if video is None and image is None:
            return None
        kind, path = ("video", video) if video is not None else ("image", image)
        path = os.path.abspath(os.fspath(path))
        if self._loaded is not None and self._loaded.key == (kind, path):
            return self._loaded
        dc = self.data_config
        try:
            if kind == "video":
                reader = frames_lib.VideoFile(path)
                indices = reader.frame_indices(dc.num_frames, dc.frame_mode, dc.fps_sample_rate)
                pixels = frames_lib.load_video_frames(reader, indices, dc)
            else:
                pixels = frames_lib.load_image(path, dc)[None]
        except SkipRecord as err:
            raise ChatError(f"cannot read the {kind}: {_describe(err)}") from None
        self._loaded = Media(kind, path, pixels)
        return self._loaded

    def frames(self, video=None, image=None) -> np.ndarray:
        """The uint8 [T, S, S, 3] frames the model sees for a video or image (default: the
        conversation's)."""
        media = self._load_media(video, image) or self.media
        if media is None:
            raise ChatError("no video or image given, and the conversation has none")
        return media.frames

    # Prompts ----------------------------------------------------------------------------------

    def _question(self, query: str, media: Media | None, first_turn: bool) -> str:
        """The query with the media placeholder where it belongs: in the first turn only."""
        n = count_placeholders(query)
        if media is None and n:
            raise ChatError(f"the question has a {tokens.VIDEO} or {tokens.IMAGE} placeholder "
                            "but no video or image was given")
        if n > 1:
            raise ChatError("the question has more than one media placeholder")
        if media is None:
            return query
        if not first_turn:
            if n:
                raise ChatError(f"the {media.kind} is in the conversation's first question "
                                "already: ask without a placeholder (or reset the conversation)")
            return query
        if not n:
            self.notify(f"note: no {media.placeholder} in the question; it goes in front")
            return f"{media.placeholder}\n{query}"
        return query

    def prompt_text(self, turns: list[tuple[str, str]], question: str, media: Media | None) -> str:
        """The prompt for `question` after the (question, answer) `turns`, placeholder expanded
        into the media tokens, up to where the model continues."""
        block = tokens.media_tokens(len(media.frames), self.num_patches) if media else ""

        def expand(q):
            return q.replace(tokens.VIDEO, block).replace(tokens.IMAGE, block)

        if self.legacy:  # valley_model.py build_inputs, which ends on the "###" after the turn
            text = self.system + "\n\n" + tokens.SEP
            for q, a in turns:
                text += f" Human: {expand(q)} \n{tokens.SEP} Assistent: {a} \n{tokens.SEP}"
            return text + f" Human: {expand(question)} \n{tokens.SEP}"
        conversation = tuple(turn for q, a in turns for turn in (("human", q), ("gpt", a)))
        prompt = format_v1(conversation + (("human", question), ("gpt", "")), block or None)
        # Up to "### Assistant:": the answer's leading space is the model's, as in training.
        text = prompt.text[:prompt.answer_spans[-1][0] - 1]
        return self.system + text[len(tokens.SYSTEM_V1):]

    def _encode(self, text: str, media: Media | None) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        ids = ([bos] if bos is not None else []) + ids
        frames = len(media.frames) if media else 0
        patches = self.num_patches if media else 0
        if (ids.count(self.ids["im_patch"]), ids.count(self.ids["vi_frame"])) != (patches, frames):
            raise ChatError(f"the conversation spells a media token such as {tokens.IM_PATCH} "
                            "itself; remove it")
        return ids

    # Asking -----------------------------------------------------------------------------------

    def ask(self, query: str, video=None, image=None, *, history: bool = True,
            max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
            top_k: int = 0, seed: int = 0, stream: Callable[[str], None] | None = None) -> str:
        """Answers `query` about a video or an image (paths; default: the conversation's) and,
        with `history`, continues the conversation (without, asks on a fresh one and records
        nothing). `stream` receives the answer in pieces as it is generated; the pieces add up
        to the returned answer exactly. Sampling: greedy at temperature 0, else from `seed`."""
        if not query.strip():
            raise ChatError("the question is empty")
        media = self._load_media(video, image)
        continuing = history and (media is None or (self.media is not None
                                                    and media.key == self.media.key))
        turns = self.turns if continuing else []
        media = media if media is not None else self.media
        question = self._question(query, media, first_turn=not turns)
        prompt_ids = self._encode(self.prompt_text(turns, question, media), media)

        room = self.context - len(prompt_ids)
        if room < 1:
            hint = " or reset the conversation" if turns else ""
            raise ChatError(f"the prompt is {len(prompt_ids)} tokens and the model's context "
                            f"{self.context}: ask a shorter question{hint}")
        if max_new_tokens > room:
            self.notify(f"note: the answer can have at most {room} tokens in the model's context "
                        f"of {self.context} (asked for {max_new_tokens})")
            max_new_tokens = room

        frames = frame_mask = None
        if media is not None:
            frames = media.frames[None]
            frame_mask = np.ones(frames.shape[:2], bool)
        sampling = generate.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k, top_p=top_p, seed=seed)
        clean = clean_legacy if self.legacy else clean_v1
        prefixes = LEGACY_PREFIXES if self.legacy else ("Assistant:",)
        token_ids: list[int] = []
        shown = ""
        for step in generate.stream(self.model, [np.asarray(prompt_ids, np.int32)], frames,
                                    frame_mask, sampling=sampling,
                                    eos_id=self.tokenizer.eos_token_id, stop_matchers=[self.stop]):
            if step[0] < 0:
                continue
            token_ids.append(int(step[0]))
            if stream is not None:
                now = shown_so_far(self._decode(token_ids), clean, prefixes)
                if len(now) > len(shown) and now.startswith(shown):
                    stream(now[len(shown):])
                    shown = now
        text = clean(self._decode(token_ids))
        if stream is not None and len(text) > len(shown):
            stream(text[len(shown):])

        if history:
            self.turns = turns + [(question, text)]
            self.media = media
        self.last = Reply(text, token_ids, prompt_ids)
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _describe(err: SkipRecord) -> str:
    reasons = {"missing_file": "no such file", "empty_file": "the file is empty",
               "corrupt_media": "cannot decode it", "media_too_small": "it is too small"}
    return f"{reasons.get(err.reason, err.reason)} ({err.detail})" if err.detail else err.reason


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m valley_jax.chat",
        description="Ask Valley about a video or an image: once (--query) or interactively "
                    "(multi-turn; the answer streams as it is generated).",
        epilog="examples:\n"
               "  --checkpoint ckpt --video clip.mp4 --query 'What moves?' --json\n"
               "  --checkpoint Valley2-7b --video clip.mp4 --legacy\n"
               "interactive commands: /reset (start over), /exit (or Ctrl-D)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="valley_jax model checkpoint, or the authors' Hugging Face folder")
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", metavar="PATH")
    media.add_argument("--image", metavar="PATH")
    parser.add_argument("--query", metavar="TEXT", help="answer this once and exit")
    parser.add_argument("--json", action="store_true",
                        help='with --query: print one JSON object {"text", "token_ids"}')
    parser.add_argument("--system", metavar="TEXT", help="system prompt (default: the mode's)")
    parser.add_argument("--legacy", action="store_true",
                        help="the authors' inference prompt and response clean-up "
                             "(default: the training template v1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-frames", type=int, metavar="N",
                        help="frames per video (default: the checkpoint's)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--debug-prompt", action="store_true",
                        help="print each prompt's and answer's token ids to stderr (JSON lines)")
    return parser


def _check_args(args) -> None:
    if args.json and args.query is None:
        raise ChatError("--json needs --query")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ChatError("sampling: --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
    if args.max_new_tokens < 1 or (args.num_frames is not None and args.num_frames < 1):
        raise ChatError("--max-new-tokens and --num-frames must be at least 1")
    # The media is checked before the (possibly minutes long) model load.
    path = args.video or args.image
    try:
        if args.video:
            frames_lib.VideoFile(path)
        else:
            frames_lib.check_media_file(path)
    except SkipRecord as err:
        raise ChatError(f"cannot read the {'video' if args.video else 'image'}: "
                        f"{_describe(err)}") from None


def _answer(session: Session, args, question: str, stream) -> str:
    return session.ask(question, video=args.video, image=args.image,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, seed=args.seed, stream=stream)


def _debug(args, session: Session) -> None:
    if args.debug_prompt:
        reply = session.last
        print("debug " + json.dumps({"prompt_tokens": len(reply.prompt_ids),
                                     "prompt_ids": reply.prompt_ids,
                                     "answer_ids": reply.token_ids, "answer": reply.text}),
              file=sys.stderr, flush=True)


def _interact(session: Session, args) -> None:
    print(f"Chatting about {args.video or args.image}. /reset starts over, /exit or Ctrl-D "
          "ends.", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("Human: ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            continue
        if not line:
            continue
        # The label goes out with the first piece, after any note about the question.
        labelled = []

        def stream(piece):
            if not labelled:
                print("Assistant: ", end="")
                labelled.append(True)
            print(piece, end="", flush=True)

        try:
            answer = _answer(session, args, line, stream)
        except ChatError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        print("" if answer else "Assistant: ", flush=True)
        _debug(args, session)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        session = load(args.checkpoint, args.num_frames, dtype=args.dtype, system=args.system,
                       legacy=args.legacy)
        if args.query is None:
            _interact(session, args)
            return 0
        if args.json:
            answer = _answer(session, args, args.query, stream=None)
            print(json.dumps({"text": answer, "token_ids": session.last.token_ids}))
        else:
            _answer(session, args, args.query,
                    stream=lambda piece: print(piece, end="", flush=True))
            print(flush=True)
        _debug(args, session)
    except (ChatError, ValueError, KeyError, OSError) as err:  # bad input: a message
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
