"""Text: the tokenizer with Valley's tokens, conversation template v1, and exact label masks.

Which tokens are learned. The prompt is

    {system}\\n\\n### Human: {q1}\\n### Assistant: {a1}\\n### Human: {q2}\\n### Assistant: {a2}\\n###

and for every round the characters of the answer plus the "\\n###" that ends it are learned (the
"###" is shared with the next round's "### Human:"). A token is learned when its character span,
from the fast tokenizer's offset mapping of the whole prompt, overlaps a learned character range;
so a token such as "▁The", whose span starts at the space after "Assistant:", is learned, and the
space-only or ":" tokens before it are not. The prompt is tokenised once; nothing is re-tokenised.
BOS is prepended (as LLaMA does) and never learned; no EOS is added (the reference adds none).

Truncation keeps whole rounds: the longest prefix of rounds that fits in max_length. A record whose
first round does not fit is skipped ("too_long"), as is one whose media block lies in a round that
does not fit ("media_truncated"). A media block is therefore never cut.
"""

import dataclasses

import numpy as np
import tokenizers

from valley_jax import tokens
from valley_jax.data.records import count_placeholders
from valley_jax.data.skips import SkipRecord

HUMAN_ROLES = ("human",)
ASSISTANT_ROLES = ("gpt",)


def load_tokenizer(path: str):
    """The Hugging Face fast tokenizer in `path`, with Valley's tokens added as the reference adds them:
    `[PAD]` only if there is no pad token, then tokens.ADDED_TOKENS in order, as special tokens."""
    # Imported here: transformers takes seconds to import, and the loader's worker processes,
    # which only need the `tokenizers` backend, must not pay for it.
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: no fast tokenizer; label masks need its offset mapping")
    tokens.add_valley_tokens(tokenizer)
    return tokenizer


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    im_patch: int
    vi_frame: int
    im_start: int
    im_end: int
    vi_start: int
    vi_end: int
    pad: int
    bos: int | None
    # len(tokenizer) after the added tokens: the model's embedding needs at least this many rows.
    vocab_size: int


def special_token_ids(tokenizer) -> SpecialTokenIds:
    """The ids the model config needs, from a tokenizer made by `load_tokenizer` (or a folder path)."""
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    # Idempotent: on a tokenizer that has the tokens it only looks their ids up.
    ids = tokens.add_valley_tokens(tokenizer)
    return SpecialTokenIds(**ids, bos=tokenizer.bos_token_id, vocab_size=len(tokenizer))


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    # Per round, the learned character range [start, end): the answer and its closing "\n###".
    answer_spans: tuple[tuple[int, int], ...]
    # Character index just past the media block, 0 when there is none.
    media_end: int


def format_v1(conversations: tuple[tuple[str, str], ...], media_text: str | None) -> Prompt:
    """Template v1 with the record's single placeholder replaced by `media_text`."""
    if len(conversations) % 2:
        raise SkipRecord("bad_conversation", "odd number of turns")
    placeholders = [count_placeholders(value) for _, value in conversations]
    if sum(placeholders) > 1:
        raise SkipRecord("multiple_placeholders", f"{sum(placeholders)} placeholders")
    if sum(placeholders) == 1 and media_text is None:
        raise SkipRecord("placeholder_without_media")
    if sum(placeholders) == 0 and media_text is not None:
        raise SkipRecord("media_without_placeholder")

    text = tokens.SYSTEM_V1 + "\n\n" + tokens.SEP
    answer_spans = []
    media_end = 0
    for (human, question), (assistant, answer), question_placeholders, answer_placeholders in zip(
        conversations[0::2], conversations[1::2], placeholders[0::2], placeholders[1::2]
    ):
        if human.lower() not in HUMAN_ROLES or assistant.lower() not in ASSISTANT_ROLES:
            raise SkipRecord("bad_conversation", f"turns from {human!r} then {assistant!r}")
        if answer_placeholders:
            raise SkipRecord("bad_conversation", "media placeholder in an answer")
        text += f" {tokens.ROLES[0]}: "
        if question_placeholders:
            placeholder = tokens.VIDEO if tokens.VIDEO in question else tokens.IMAGE
            before, after = question.split(placeholder)
            media_end = len(text) + len(before) + len(media_text)
            question = before + media_text + after
        text += f"{question}\n{tokens.SEP} {tokens.ROLES[1]}: "
        answer_start = len(text)
        text += f"{answer}\n{tokens.SEP}"
        answer_spans.append((answer_start, len(text)))
    return Prompt(text, tuple(answer_spans), media_end)


class TextEncoder:
    """Prompt -> (input_ids, labels), unpadded int32, BOS first. Picklable: it holds the `tokenizers`
    backend only, so worker processes never import transformers."""

    def __init__(self, tokenizer, max_length: int, num_patches: int):
        self.ids = special_token_ids(tokenizer)
        # A private copy without padding or truncation that a tokenizer.json may switch on.
        self._backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_padding()
        self._backend.no_truncation()
        self.max_length = max_length
        self.num_patches = num_patches

    def media_text(self, num_frames: int) -> str:
        return tokens.media_tokens(num_frames, self.num_patches)

    def encode(self, prompt: Prompt, num_media_frames: int) -> tuple[np.ndarray, np.ndarray]:
        encoding = self._backend.encode(prompt.text, add_special_tokens=False)
        input_ids = np.asarray(encoding.ids, np.int32)
        offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]

        learned = np.zeros(len(input_ids), bool)
        for span_start, span_end in prompt.answer_spans:
            learned |= (starts < span_end) & (ends > span_start)

        # Tokens that end within each round (a token straddling a round's end goes with the next
        # round); the running max keeps searchsorted valid should an offset ever step back.
        monotone_ends = np.maximum.accumulate(ends) if len(ends) else ends
        round_ends = [span_end for _, span_end in prompt.answer_spans]
        tokens_per_prefix = np.searchsorted(monotone_ends, round_ends, side="right")
        num_bos = 0 if self.ids.bos is None else 1
        rounds_that_fit = int(np.sum(num_bos + tokens_per_prefix <= self.max_length))
        if rounds_that_fit == 0:
            raise SkipRecord("too_long", f"first round is {num_bos + tokens_per_prefix[0]} tokens")
        if prompt.media_end > round_ends[rounds_that_fit - 1]:
            raise SkipRecord("media_truncated", f"{rounds_that_fit} of {len(round_ends)} rounds fit")
        cut = tokens_per_prefix[rounds_that_fit - 1]
        input_ids, learned = input_ids[:cut], learned[:cut]

        self._check_media_tokens(input_ids, num_media_frames)
        labels = np.where(learned, input_ids, tokens.IGNORE_INDEX).astype(np.int32)
        if num_bos:
            input_ids = np.concatenate([np.int32([self.ids.bos]), input_ids])
            labels = np.concatenate([np.int32([tokens.IGNORE_INDEX]), labels])
        return input_ids, labels

    def _check_media_tokens(self, input_ids: np.ndarray, num_media_frames: int) -> None:
        """The media token ids appear exactly as often as one block of `num_media_frames` frames
        needs; more means the record's own text spells them, which would shift the features."""
        has_media = int(num_media_frames > 0)
        expected = {
            self.ids.im_start: has_media,
            self.ids.im_patch: has_media * self.num_patches,
            self.ids.im_end: has_media,
            self.ids.vi_start: has_media,
            self.ids.vi_frame: num_media_frames,
            self.ids.vi_end: has_media,
        }
        for token_id, count in expected.items():
            found = int(np.count_nonzero(input_ids == token_id))
            if found != count:
                raise SkipRecord("media_token_in_text", f"token {token_id} appears {found} times, expected {count}")
