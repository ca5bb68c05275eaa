"""Tokens and labels: Valley's special tokens, template v1, exact label masks, round truncation."""

import os
import shutil

import numpy as np
import pytest
import sentencepiece
import transformers

from test_data_fixtures import MAX_LENGTH, NUM_FRAMES, NUM_PATCHES, tokenizer_dir  # noqa: F401 (fixture)
from valley_jax import tokens
from valley_jax.data.skips import SkipRecord
from valley_jax.data.text import TextEncoder, format_v1, load_tokenizer, special_token_ids

TWO_TURNS = (
    ("human", "<video>\nWhat is the cat doing?"),
    ("gpt", "The cat chases a red ball."),
    ("human", "And then?"),
    ("gpt", "It sleeps on the floor."),
)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):  # noqa: F811
    return load_tokenizer(tokenizer_dir)


def encoder_for(tokenizer, max_length=MAX_LENGTH):
    return TextEncoder(tokenizer, max_length=max_length, num_patches=NUM_PATCHES)


def learned_runs(labels: np.ndarray) -> list[np.ndarray]:
    """Positions of each maximal run of learned labels."""
    positions = np.flatnonzero(labels != tokens.IGNORE_INDEX)
    return np.split(positions, np.flatnonzero(np.diff(positions) > 1) + 1) if len(positions) else []


def test_template_v1_text_is_exact():
    media = tokens.media_tokens(NUM_FRAMES, NUM_PATCHES)
    prompt = format_v1(TWO_TURNS, media)
    expected = (
        f"{tokens.SYSTEM_V1}\n\n### Human: {media}\nWhat is the cat doing?\n### Assistant: The cat chases a red ball."
        "\n### Human: And then?\n### Assistant: It sleeps on the floor.\n###"
    )
    assert prompt.text == expected
    assert [prompt.text[a:b] for a, b in prompt.answer_spans] == [
        "The cat chases a red ball.\n###",
        "It sleeps on the floor.\n###",
    ]
    assert prompt.text[: prompt.media_end].endswith(tokens.VI_END)


def test_learned_tokens_decode_to_exactly_the_two_answers(tokenizer):
    encoder = encoder_for(tokenizer)
    prompt = format_v1(TWO_TURNS, encoder.media_text(NUM_FRAMES))
    input_ids, labels = encoder.encode(prompt, NUM_FRAMES)

    runs = learned_runs(labels)
    assert [tokenizer.decode(input_ids[run]) for run in runs] == [
        "The cat chases a red ball.\n###",
        "It sleeps on the floor.\n###",
    ]
    learned = labels != tokens.IGNORE_INDEX
    np.testing.assert_array_equal(labels[learned], input_ids[learned])
    # Everything before the first answer (BOS, system, "### Human:", media, question) is ignored.
    assert runs[0][0] > np.flatnonzero(input_ids == encoder.ids.vi_end)[0]


def test_ids_are_one_tokenisation_of_the_whole_prompt_after_bos(tokenizer):
    encoder = encoder_for(tokenizer)
    prompt = format_v1(TWO_TURNS, encoder.media_text(NUM_FRAMES))
    input_ids, labels = encoder.encode(prompt, NUM_FRAMES)
    assert input_ids[0] == tokenizer.bos_token_id == 1
    assert labels[0] == tokens.IGNORE_INDEX
    assert input_ids[1:].tolist() == tokenizer(prompt.text, add_special_tokens=False).input_ids
    assert input_ids.dtype == labels.dtype == np.int32


def test_media_block_is_one_run_of_the_right_ids(tokenizer):
    encoder = encoder_for(tokenizer)
    ids = encoder.ids
    input_ids, _ = encoder.encode(format_v1(TWO_TURNS, encoder.media_text(3)), 3)
    start = int(np.flatnonzero(input_ids == ids.im_start)[0])
    block = input_ids[start : start + NUM_PATCHES + 3 + 4].tolist()
    assert block == [ids.im_start] + [ids.im_patch] * NUM_PATCHES + [ids.im_end, ids.vi_start] + [ids.vi_frame] * 3 + [
        ids.vi_end
    ]


def test_special_tokens_are_added_in_the_reference_order(tokenizer_dir):  # noqa: F811
    base = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model")).get_piece_size()
    ids = special_token_ids(tokenizer_dir)
    # No pad token in a LLaMA tokenizer: [PAD] first, then ADDED_TOKENS in order.
    assert (ids.pad, ids.vi_frame, ids.vi_start, ids.vi_end, ids.im_patch, ids.im_start, ids.im_end) == tuple(
        range(base, base + 7)
    )
    assert ids.vocab_size == base + 7
    assert ids.bos == 1


def test_a_tokenizer_json_folder_gives_the_same_ids(tokenizer_dir, tmp_path):  # noqa: F811
    plain = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    json_dir = tmp_path / "json_tokenizer"
    plain.save_pretrained(json_dir)
    if (json_dir / "tokenizer.model").exists():
        os.remove(json_dir / "tokenizer.model")
    assert (json_dir / "tokenizer.json").exists()

    from_model, from_json = (encoder_for(load_tokenizer(path)) for path in (tokenizer_dir, str(json_dir)))
    prompt = format_v1(TWO_TURNS, from_model.media_text(NUM_FRAMES))
    assert from_json.ids == from_model.ids
    for a, b in zip(from_model.encode(prompt, NUM_FRAMES), from_json.encode(prompt, NUM_FRAMES)):
        np.testing.assert_array_equal(a, b)
    shutil.rmtree(json_dir)


def test_truncation_keeps_whole_rounds(tokenizer):
    full_ids, _ = encoder_for(tokenizer).encode(format_v1(TWO_TURNS, tokens.media_tokens(NUM_FRAMES, NUM_PATCHES)), NUM_FRAMES)
    prompt = format_v1(TWO_TURNS, tokens.media_tokens(NUM_FRAMES, NUM_PATCHES))
    one_round_tokens = 1 + len(tokenizer(prompt.text[: prompt.answer_spans[0][1]], add_special_tokens=False).input_ids)

    # Room for the first round and part of the second: only the first is kept, ending in "###".
    max_length = len(full_ids) - 3
    input_ids, labels = encoder_for(tokenizer, max_length).encode(prompt, NUM_FRAMES)
    assert len(input_ids) == one_round_tokens <= max_length
    np.testing.assert_array_equal(input_ids, full_ids[: len(input_ids)])
    assert [tokenizer.decode(input_ids[run]) for run in learned_runs(labels)] == ["The cat chases a red ball.\n###"]

    with pytest.raises(SkipRecord) as skip:
        encoder_for(tokenizer, one_round_tokens - 1).encode(prompt, NUM_FRAMES)
    assert skip.value.reason == "too_long"


def test_media_in_a_round_that_does_not_fit_is_skipped(tokenizer):
    late_media = (
        ("human", "Hello."),
        ("gpt", "Hi."),
        ("human", "<image>\nWhat is this?"),
        ("gpt", "A dog."),
    )
    prompt = format_v1(late_media, tokens.media_tokens(1, NUM_PATCHES))
    first_round = prompt.text[: prompt.answer_spans[0][1]]
    max_length = 1 + len(tokenizer(first_round, add_special_tokens=False).input_ids)
    with pytest.raises(SkipRecord) as skip:
        encoder_for(tokenizer, max_length).encode(prompt, 1)
    assert skip.value.reason == "media_truncated"


@pytest.mark.parametrize(
    "turns, media, reason",
    [
        ((("human", "<video>\nA?"), ("gpt", "B."), ("human", "<video> again?"), ("gpt", "C.")), True, "multiple_placeholders"),
        ((("human", "<video><image>\nA?"), ("gpt", "B.")), True, "multiple_placeholders"),
        ((("human", "<video>\nA?"), ("gpt", "B.")), False, "placeholder_without_media"),
        ((("human", "A?"), ("gpt", "B.")), True, "media_without_placeholder"),
        ((("human", "A?"),), False, "bad_conversation"),
        ((("gpt", "A?"), ("human", "B.")), False, "bad_conversation"),
        ((("human", "A?"), ("gpt", "<image> B.")), True, "bad_conversation"),
    ],
)
def test_malformed_conversations_are_skipped(turns, media, reason):
    with pytest.raises(SkipRecord) as skip:
        format_v1(turns, tokens.media_tokens(1, NUM_PATCHES) if media else None)
    assert skip.value.reason == reason


def test_media_tokens_spelled_in_the_text_are_skipped(tokenizer):
    turns = (("human", "<image>\nWhat is <im_patch>?"), ("gpt", "A token."))
    with pytest.raises(SkipRecord) as skip:
        encoder_for(tokenizer).encode(format_v1(turns, tokens.media_tokens(1, NUM_PATCHES)), 1)
    assert skip.value.reason == "media_token_in_text"
