"""Valley's special tokens, media token layout and conversation template (v1).

Everything here is fixed by the reference implementation (see ../shared/VALLEY_SPEC.md): the
strings, the order in which tokens are added to a tokenizer, and the prompt formats.
"""

IGNORE_INDEX = -100

PAD = "[PAD]"
VIDEO = "<video>"
IMAGE = "<image>"
VI_FRAME = "<vi_frame>"
VI_START = "<vi_start>"
VI_END = "<vi_end>"
IM_PATCH = "<im_patch>"
IM_START = "<im_start>"
IM_END = "<im_end>"

# The order in which the reference adds tokens; ids follow from it. [PAD] only when the
# tokenizer has no pad token.
ADDED_TOKENS = (VI_FRAME, VI_START, VI_END, IM_PATCH, IM_START, IM_END)

SEP = "###"
ROLES = ("Human", "Assistant")
SYSTEM_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# The system prompt of the reference's inference scripts (valley/inference/run_valley.py).
SYSTEM_INFERENCE = (
    "You are Valley, a large language and vision assistant trained by ByteDance. You are able to "
    "understand the visual content or video that the user provides, and assist the user with a "
    "variety of tasks using natural language. Follow the instructions carefully and explain your "
    "answers in detail."
)


def media_tokens(num_frames: int, num_patches: int = 256) -> str:
    """The text that replaces one `<video>` / `<image>` placeholder (an image has one frame)."""
    return IM_START + IM_PATCH * num_patches + IM_END + VI_START + VI_FRAME * num_frames + VI_END


def add_valley_tokens(tokenizer) -> dict:
    """Adds Valley's tokens to a Hugging Face tokenizer in the reference's order and returns
    their ids: {'pad', 'vi_frame', 'vi_start', 'vi_end', 'im_patch', 'im_start', 'im_end'}.

    `[PAD]` is added only when the tokenizer has no pad token. Idempotent: tokens already in the
    vocabulary keep their ids. The caller resizes embeddings to `len(tokenizer)`.
    """
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.add_tokens(list(ADDED_TOKENS), special_tokens=True)
    names = ("vi_frame", "vi_start", "vi_end", "im_patch", "im_start", "im_end")
    ids = {"pad": tokenizer.pad_token_id}
    ids.update({n: tokenizer.convert_tokens_to_ids(t) for n, t in zip(names, ADDED_TOKENS)})
    return ids
