"""Probes of a trained demo model (issue #6): does it know which shape moves first, does its
order reply follow the video rather than the question's wording, and does it read which shape a
colour or shape question asks about?

    python bench/demo_probe.py --workdir /tmp/valley_demo/stage2 [--train-clips 300] [--json PATH]

The questions are built from the workdir's synthetic dataset (`WORKDIR/data`): its clips' scenes
come from `synthetic.draw_split` with the arguments in its `meta.json`, so the truths come from
the scenes, not from any file's answers. Every two-shape clip of `val` (and of the first
`--train-clips` of `train`) is asked:

- for a caption, "Describe the video briefly." (a prompt of stage 1's captions, which stage 2 of
  the demo trains on too). A caption names the shape that moves first first ("a red circle moves
  left, then a blue square moves up"): scored as the share of captions whose first colour is the
  first mover's, and of captions right word for word;
- the move-order question both ways, naming the shapes by colour: "Does the A object move before
  or after the B object?" and the same with A and B swapped. The reply names the two in the
  order they move ("The B object moves first, then the A object."), so it is the same both ways.
  Scored as the share of questions answered right (chance 0.50) and the share of clips whose two
  replies are alike: a model that reads the order off the video replies alike; one that repeats
  the question's order replies differently, and gets exactly half right;
- the shape question about each of the two shapes, naming it by colour ("What shape is the A
  object?"), and the colour question about each, naming it by shape ("What colour is the
  circle?"). The two shapes differ in colour and in shape, so the right replies differ: a model
  that answers alike has not read the question's colour (or shape) word, and gets exactly half
  right. Scored as for move order.

Answers are scored as the trainer scores them (`qa.score`: exact match after normalisation).
Greedy generation through `python -m valley_jax.evaluate` (its predictions and results are left
in `--out`, default WORKDIR/probe). Figures in BENCHMARKS.md, "CPU demo".
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re

from valley_jax import evaluate, qa, tokens
from valley_jax.data import synthetic

CAPTION_PROMPT = synthetic.CAPTION_PROMPTS["video"][0]
ORDER_TEMPLATE = synthetic.QUESTIONS["move_order"][0]
SHAPE_TEMPLATE = synthetic.QUESTIONS["shape"][0]
COLOUR_TEMPLATE = synthetic.QUESTIONS["colour"][0]
_COLOURS = re.compile("|".join(synthetic.COLOURS))


def probe_records(split: str, meta_args: dict, max_clips: int | None) -> list[dict]:
    """One caption record, and two move-order, two shape and two colour records (one about each
    shape), for each two-shape clip of `split`."""
    # Round 0 (the records zipped with the scenes below) is the same for any number of rounds.
    scenes, _, qa = synthetic.draw_split(
        split, seed=meta_args["seed"], num_train=meta_args["num_train"],
        size=meta_args["size"], frames=meta_args["frames"], qa_rounds=1)
    records = []
    clips = 0
    for scene, record in zip(scenes, qa):
        if not scene.is_video or len(scene.sprites) != 2:
            continue
        if max_clips is not None and clips >= max_clips:
            break
        clips += 1
        clip = record["id"].replace("_qa_", "_")
        first = min(scene.sprites, key=lambda sprite: sprite.move_start)
        records.append(_record(f"{clip}_caption", record["video"], CAPTION_PROMPT,
                               synthetic.caption(scene), f"caption_{split}", first=first.colour))
        for named in ((0, 1), (1, 0)):
            a, b = (scene.sprites[i] for i in named)
            question = ORDER_TEMPLATE.format(ref=f"{a.colour} object", other=f"{b.colour} object")
            answer = synthetic.answer_text("move_order", scene, named, "colour",
                                           "before" if a is first else "after")
            records.append(_record(f"{clip}_order_{a.colour}", record["video"], question, answer,
                                   f"order_{split}", clip=clip))
        for i, sprite in enumerate(scene.sprites):
            question = SHAPE_TEMPLATE.format(ref=f"{sprite.colour} object")
            answer = synthetic.answer_text("shape", scene, (i,), "colour", sprite.shape)
            records.append(_record(f"{clip}_shape_{sprite.colour}", record["video"], question,
                                   answer, f"shape_{split}", clip=clip))
            question = COLOUR_TEMPLATE.format(ref=sprite.shape)
            answer = synthetic.answer_text("colour", scene, (i,), "shape", sprite.colour)
            records.append(_record(f"{clip}_colour_{sprite.shape}", record["video"], question,
                                   answer, f"colour_{split}", clip=clip))
    return records


def _record(record_id: str, video: str, question: str, answer: str, qtype: str, **extra) -> dict:
    return {"id": record_id, "video": video, **extra, "conversations": [
        {"from": "human", "value": f"{tokens.VIDEO}\n{question}"},
        {"from": "gpt", "value": answer, "qtype": qtype}]}


def score(records: list[dict], predictions: dict[str, str]) -> dict[str, dict]:
    """Per probe: the figures the module docstring describes."""
    by_qtype = collections.defaultdict(list)
    for record in records:
        by_qtype[record["conversations"][1]["qtype"]].append(record)
    out = {}
    for qtype, group in sorted(by_qtype.items()):
        if qtype.startswith("caption"):
            firsts = [_COLOURS.findall(predictions[r["id"]])[:1] == [r["first"]] for r in group]
            exact = [qa.score(predictions[r["id"]], r["conversations"][1]["value"])["exact"]
                     for r in group]
            out[qtype] = dict(clips=len(group), first_mover_named_first=sum(firsts) / len(group),
                              exact=sum(exact) / len(group))
            continue
        right = [qa.score(predictions[r["id"]], r["conversations"][1]["value"])["exact"]
                 for r in group]
        answers = collections.defaultdict(set)
        for r in group:
            answers[r["clip"]].add(qa.normalise(predictions[r["id"]]))
        out[qtype] = dict(questions=len(group), accuracy=sum(right) / len(group),
                          clips_answered_alike=sum(len(a) == 1 for a in answers.values())
                          / len(answers))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a demo run's workdir (holds data/ and model/)")
    p.add_argument("--checkpoint", help="default: WORKDIR/model")
    p.add_argument("--out", help="default: WORKDIR/probe")
    p.add_argument("--train-clips", type=int, default=300,
                   help="two-shape training clips to ask (0: none)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    data = os.path.join(args.workdir, "data")
    with open(os.path.join(data, "meta.json")) as f:
        meta_args = json.load(f)["args"]
    records = probe_records("val", meta_args, None)
    if args.train_clips:
        records += probe_records("train", meta_args, args.train_clips)
    out = args.out or os.path.join(args.workdir, "probe")
    os.makedirs(out, exist_ok=True)
    questions = os.path.join(out, "questions.json")
    with open(questions, "w") as f:
        json.dump(records, f)
    evaluate.main(["--checkpoint", args.checkpoint or os.path.join(args.workdir, "model"),
                   "--format", "valley", "--questions", questions, "--video-dir", data,
                   "--out", out, "--max-new-tokens", "32", "--no-progress"])
    predictions = {p["id"].split("#")[0]: p["pred"] or ""
                   for p in evaluate.read_predictions(out).values()}
    figures = score(records, predictions)
    for qtype, row in figures.items():
        print(qtype, " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
