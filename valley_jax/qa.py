"""Open-ended QA by greedy generation, scored offline (normalised exact and contains match).

Used by the trainer's periodic evaluation on the synthetic world's `val` splits and by
`python -m valley_jax.evaluate` when no judge model is given. Every QA turn of a record is asked
with the record's earlier turns (gold answers) as history, in the training template (v1), and
the answer is generated after "### Assistant:" up to the next "###".
"""

from __future__ import annotations

import collections
import json
import re
import string
from typing import Iterable

import numpy as np

from valley_jax import tokens
from valley_jax.data import frames as frames_lib
from valley_jax.data.records import parse_record, read_records, resolve_media_path
from valley_jax.data.text import format_v1
from valley_jax.generate import SamplingConfig, cut_at_stop, generate

_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score(prediction: str, answer: str) -> dict:
    p, a = normalise(prediction), normalise(answer)
    return {"exact": float(p == a), "contains": float(bool(a) and re.search(rf"\b{re.escape(a)}\b", p) is not None)}


def qa_items(path: str, max_items: int | None = None) -> list[dict]:
    """One item per QA turn of a Valley JSON (`.json` list or `.jsonl`) file: {id, qtype,
    history (earlier turns), question, answer, media_kind, media_path}; the first `max_items`
    turns in file order, all of them when it is None or 0."""
    items = []
    for line in read_records(path):
        raw = json.loads(line)
        record = parse_record(raw)
        conv = list(record.conversations)
        for k in range(0, len(conv) - 1, 2):
            gpt_turn = raw["conversations"][k + 1]
            items.append(dict(id=f"{record.id}#{k // 2}", qtype=gpt_turn.get("qtype", "all"),
                              history=tuple(conv[:k]), question=conv[k][1], answer=conv[k + 1][1],
                              media_kind=record.media_kind, media_path=record.media_path))
            if max_items and len(items) >= max_items:
                return items
    return items


def prompt_text(item: dict, num_frames: int, num_patches: int, legacy: bool = False) -> str:
    """The v1 prompt up to and including "### Assistant:" (the answer's leading space is the
    model's to generate, as in training).

    legacy: the authors' inference prompt instead (valley/model/valley_model.py `build_inputs`,
    as `valley_jax.chat` writes it with `legacy=True`): `{SYSTEM_INFERENCE}\n\n### Human: {q}
    \n###`, earlier turns as ` Human: {q} \n### Assistent: {a} \n###` (their spelling).
    """
    media = tokens.media_tokens(num_frames, num_patches) if num_frames else None
    conv = item["history"] + (("human", item["question"]), ("gpt", ""))
    if media is not None and not any(tokens.VIDEO in v or tokens.IMAGE in v for _, v in conv):
        media = None
    if legacy:
        def expand(text):
            block = media or ""
            return text.replace(tokens.VIDEO, block).replace(tokens.IMAGE, block)

        text = tokens.SYSTEM_INFERENCE + "\n\n" + tokens.SEP
        for (_, q), (_, a) in zip(item["history"][0::2], item["history"][1::2]):
            text += f" Human: {expand(q)} \n{tokens.SEP} Assistent: {a} \n{tokens.SEP}"
        return text + f" Human: {expand(item['question'])} \n{tokens.SEP}"
    prompt = format_v1(conv, media)
    return prompt.text[: prompt.answer_spans[-1][0] - 1]


def load_media(item: dict, data_config, root: str):
    t = data_config.num_frames
    size = data_config.image_size
    frames = np.zeros((t, size, size, 3), np.uint8)
    mask = np.zeros((t,), bool)
    if item["media_kind"] == "video":
        video = frames_lib.VideoFile(resolve_media_path(root, item["media_path"]))
        idx = video.frame_indices(t, data_config.frame_mode, data_config.fps_sample_rate)
        frames[: len(idx)] = frames_lib.load_video_frames(video, idx, data_config)
        mask[: len(idx)] = True
    elif item["media_kind"] == "image":
        frames[0] = frames_lib.load_image(resolve_media_path(root, item["media_path"]), data_config)
        mask[0] = True
    return frames, mask


def stop_ids(tokenizer, stop: str = "\n" + tokens.SEP) -> list[int]:
    """The ids `stop` gets after an answer word (in context: sentencepiece tokenises a string
    alone with a leading-space marker that it does not have mid-text)."""
    base = tokenizer.encode("red", add_special_tokens=False)
    full = tokenizer.encode("red" + stop, add_special_tokens=False)
    if full[: len(base)] != base:
        raise ValueError(f"cannot isolate the tokens of {stop!r} in this tokenizer")
    return full[len(base):]


def answer(model, tokenizer, items: list[dict], data_config, root: str, *, batch_size: int = 16,
           max_new_tokens: int = 16, legacy: bool = False) -> list[str]:
    """Greedy answers for QA items (batched; prompts of different lengths together).

    legacy: the authors' inference prompt and response clean-up (see `prompt_text`)."""
    stop = stop_ids(tokenizer)
    if legacy:
        from valley_jax.chat import clean_legacy as clean
    else:
        clean = cut_at_stop
    predictions = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        media = [load_media(it, data_config, root) for it in chunk]
        prompts = []
        for it, (_, mask) in zip(chunk, media):
            ids = tokenizer.encode(prompt_text(it, int(mask.sum()), data_config.num_patches,
                                               legacy), add_special_tokens=False)
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            prompts.append(np.asarray(bos + ids, np.int32))
        real = len(chunk)
        if start:  # a short last batch padded with its last row: one compiled shape, not two
            media += [media[-1]] * (batch_size - real)
            prompts += [prompts[-1]] * (batch_size - real)
        frames = np.stack([m[0] for m in media])
        frame_mask = np.stack([m[1] for m in media])
        out = generate(model, prompts, frames, frame_mask,
                       sampling=SamplingConfig(max_new_tokens=max_new_tokens),
                       eos_id=tokenizer.eos_token_id, stop_sequences=[stop])
        predictions += [clean(tokenizer.decode(o, skip_special_tokens=True)) for o in out[:real]]
    return predictions


def accuracy(items: Iterable[dict], predictions: Iterable[str]) -> dict:
    """{qtype: {"exact": .., "contains": .., "n": ..}} plus "all"."""
    sums = collections.defaultdict(lambda: collections.Counter())
    for it, pred in zip(items, predictions):
        s = score(pred, it["answer"])
        for key in {it["qtype"], "all"}:  # a set: an item of qtype "all" counts once
            sums[key]["exact"] += s["exact"]
            sums[key]["contains"] += s["contains"]
            sums[key]["n"] += 1
    return {k: {"exact": v["exact"] / v["n"], "contains": v["contains"] / v["n"], "n": int(v["n"])}
            for k, v in sorted(sums.items())}
