"""Zero-shot video QA evaluation: `python -m valley_jax.evaluate`.

    python -m valley_jax.evaluate --checkpoint CKPT --format msvd \\
        --questions MSVD_Zero_Shot_QA/test_q.json --answers MSVD_Zero_Shot_QA/test_a.json \\
        --video-dir MSVD_Zero_Shot_QA/videos --out runs/msvd \\
        [--judge-url https://api.openai.com/v1 --judge-model gpt-3.5-turbo-0125]
    python -m valley_jax.evaluate --checkpoint WORKDIR/model --format valley \\
        --questions WORKDIR/data/val.json --out runs/val          # offline metric only

Reads top to bottom: the datasets (the field's file layouts, made into QA items), the model,
predictions (a JSON-lines file per process, resumable), scoring (the offline metric always, the
judge when given), results.json, and the command line.

Dataset layouts (`--format`), as Video-ChatGPT's and Video-LLaVA's evaluation scripts read them:

- `msvd`, `msrvtt`, `activitynet`, `tgif` (zero-shot open-ended QA): `--questions test_q.json`,
  a list of {"video_name", "question_id", "question"}; `--answers test_a.json`, a list of
  {"answer", "question_id", "type" (optional: ActivityNet's 0-8, reported per type)}, paired by
  question_id (by position when the answers carry none); `--video-dir` holding `{video_name}.ext`
  or `v_{video_name}.ext` (ActivityNet), ext one of .mp4 .avi .mov .mkv .webm.
- `vcg-generic`, `vcg-temporal`, `vcg-consistency` (Video-ChatGPT's benchmark, Benchmarking_QA/
  generic_qa.json, temporal_qa.json, consistency_qa.json): lists of {"video_name", "Q", "A"},
  consistency {"video_name", "Q1", "Q2", "A"}; `--video-dir` is Test_Videos. Generic is judged
  on correctness, detail orientation and context, temporal on temporal understanding,
  consistency on consistency; an item's id is `{video_name}_{k}` (k-th question on that video).
- `valley`: Valley JSON (`.json` list or `.jsonl`), every QA turn asked with the record's
  earlier turns as history, `qtype` from the answer turn (the synthetic world's val splits);
  media under `--video-dir` (default: the file's folder).

Prompts: the training template v1 (as the trainer's evaluation asks), or with --legacy the
authors' inference prompt and answer clean-up (as valley_jax.chat --legacy).

Predictions: OUT/predictions.jsonl, or OUT/predictions-002-of-004.jsonl for process 2 of 4, one
line {"id", "question", "answer", "pred", "qtype", "video"} per item (the field's merge.jsonl
fields), appended after every batch; a rerun skips the ids any prediction file holds. Items are
dealt round-robin to the processes. When every item has a prediction, the process that sees it
scores: the offline metric (qa.py: normalised exact and contains match, per question type) and,
with --judge-url, the judge (judge.py; the QA protocol for the QA formats and `valley`, the
benchmark's axes for `vcg-*`). OUT/results.json holds every figure with what produced it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import fcntl
import glob
import importlib.metadata
import json
import logging
import os
import shlex
import subprocess
import sys

from valley_jax import judge as judge_lib
from valley_jax import qa, tokens
from valley_jax.data.skips import SkipRecord

log = logging.getLogger("valley_jax.evaluate")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
ZERO_SHOT_QA = ("msvd", "msrvtt", "activitynet", "tgif")
VCG = {"vcg-generic": ("correctness", "detail", "context"), "vcg-temporal": ("temporal",),
       "vcg-consistency": ("consistency",)}
FORMATS = ("valley",) + ZERO_SHOT_QA + tuple(VCG)
# ActivityNet-QA's `type` of a question (0-2) or, for free questions, of its answer (3-8).
ACTIVITYNET_TYPES = {0: "motion", 1: "spatial_relation", 2: "temporal_relation", 3: "yes_no",
                     4: "color", 5: "object", 6: "location", 7: "number", 8: "other"}


class EvaluationError(Exception):
    """A problem with the inputs or the output folder: reported as a message."""


# ---------------------------------------------------------------------------------------------
# Datasets: the field's files -> QA items (the dicts qa.answer reads, plus `text`: the question
# as a judge reads it, without the media placeholder)


def _read_json_list(path: str) -> list:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise EvaluationError(f"{path}: cannot read it: {err}") from None
    if not isinstance(data, list):
        raise EvaluationError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


class VideoFinder:
    """Finds `{name}.ext` or `v_{name}.ext` in a flat folder (listed once: MSRVTT has 10,000)."""

    def __init__(self, video_dir: str):
        if not os.path.isdir(video_dir):
            raise EvaluationError(f"--video-dir {video_dir}: no such folder")
        self.names = set(os.listdir(video_dir))
        self.missing: list[str] = []

    def find(self, name: str) -> str | None:
        name = str(name)
        candidates = [name] if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS else []
        candidates += [p + name + ext for p in ("", "v_") for ext in VIDEO_EXTENSIONS]
        for candidate in candidates:
            if candidate in self.names:
                return candidate
        self.missing.append(name)
        return None


def _video_item(id_, question: str, answer: str, video: str, qtype: str = "all", **extra) -> dict:
    return dict(id=str(id_), qtype=qtype, history=(), question=f"{tokens.VIDEO}\n{question}",
                text=question, answer=answer, media_kind="video", media_path=video, **extra)


def zero_shot_qa_items(questions_path: str, answers_path: str, finder: VideoFinder,
                       type_names: dict | None = None) -> list[dict]:
    """Items of a test_q.json / test_a.json pair; an answer's `type` becomes the item's qtype
    (named by `type_names` when it has the type)."""
    type_names = type_names or {}
    questions = _read_json_list(questions_path)
    answers = _read_json_list(answers_path)
    try:
        if all(isinstance(a, dict) and "question_id" in a for a in answers):
            by_id = {str(a["question_id"]): a for a in answers}
            lost = [q["question_id"] for q in questions if str(q["question_id"]) not in by_id]
            if lost:
                raise EvaluationError(f"{answers_path}: no answer for question_id {lost[0]!r} "
                                      f"(and {len(lost) - 1} more)")
            paired = [(q, by_id[str(q["question_id"])]) for q in questions]
        elif len(questions) == len(answers):
            paired = list(zip(questions, answers))  # by position, as the field's scripts pair
        else:
            raise EvaluationError(f"{len(questions)} questions but {len(answers)} answers, and "
                                  "the answers carry no question_id to pair them by")
        items = []
        for q, a in paired:
            video = finder.find(q["video_name"])
            if video is not None:
                qtype = str(type_names.get(a["type"], a["type"])) if "type" in a else "all"
                items.append(_video_item(q["question_id"], q["question"], str(a["answer"]),
                                         video, qtype))
    except (KeyError, TypeError) as err:
        raise EvaluationError(f"{questions_path} / {answers_path}: a question or an answer "
                              f"lacks the field {err}") from None
    return items


def vcg_items(path: str, fmt: str, finder: VideoFinder) -> list[dict]:
    """Video-ChatGPT's benchmark; ids as its scripts make them: `{video_name}_{k}`."""
    seen = collections.Counter()
    items = []
    for record in _read_json_list(path):
        try:
            name = str(record["video_name"])
            key = f"{name}_{seen[name]}"
            seen[name] += 1
            video = finder.find(name)
            if video is None:
                continue
            if fmt == "vcg-consistency":
                for slot in (1, 2):
                    items.append(_video_item(f"{key}#{slot}", record[f"Q{slot}"], record["A"],
                                             video, pair=key, slot=slot))
            else:
                items.append(_video_item(key, record["Q"], record["A"], video))
        except (KeyError, TypeError) as err:
            raise EvaluationError(f"{path}: a record lacks {err}: "
                                  f"{json.dumps(record)[:200]}") from None
    return items


def valley_items(path: str, max_items: int | None) -> list[dict]:
    try:
        items = qa.qa_items(path, max_items)
    except (OSError, ValueError, SkipRecord) as err:
        raise EvaluationError(f"{path}: {err}") from None
    for it in items:
        it["text"] = it["question"].replace(tokens.VIDEO, "").replace(tokens.IMAGE, "").strip()
    return items


def load_items(args) -> tuple[list[dict], str, int]:
    """(items, media root, videos missing from --video-dir)."""
    if args.format == "valley":
        root = args.video_dir or os.path.dirname(os.path.abspath(args.questions))
        return valley_items(args.questions, args.max_items), root, 0
    if not args.video_dir:
        raise EvaluationError(f"--format {args.format} needs --video-dir")
    finder = VideoFinder(args.video_dir)
    if args.format in ZERO_SHOT_QA:
        if not args.answers:
            raise EvaluationError(f"--format {args.format} needs --answers (test_a.json)")
        items = zero_shot_qa_items(args.questions, args.answers, finder,
                                   ACTIVITYNET_TYPES if args.format == "activitynet" else None)
    else:
        items = vcg_items(args.questions, args.format, finder)
    if finder.missing and not args.allow_missing:
        raise EvaluationError(
            f"{len(finder.missing)} videos are not in {args.video_dir} (e.g. "
            f"{', '.join(finder.missing[:3])}); pass --allow-missing to evaluate without them "
            "(results.json counts them)")
    if args.max_items:
        items = items[: args.max_items]
    return items, args.video_dir, len(finder.missing)


def check_unique(items: list[dict]) -> None:
    counts = collections.Counter(it["id"] for it in items)
    repeated = [i for i, n in counts.items() if n > 1]
    if repeated:
        raise EvaluationError(f"{len(repeated)} item ids repeat (e.g. {repeated[:3]}); "
                              "predictions are keyed by id")


# ---------------------------------------------------------------------------------------------
# The model


def resolve_checkpoint(path: str, out: str) -> str:
    """A valley_jax checkpoint: `path` itself, or the authors' Hugging Face folder at `path`
    converted once into OUT/checkpoint (kept, so that a resumed run does not convert again)."""
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise EvaluationError(f"{config_path}: cannot read it ({err}): --checkpoint must be a "
                              "valley_jax checkpoint or a Hugging Face Valley folder") from None
    if "format" in meta:
        return path
    converted = os.path.join(out, "checkpoint")
    with _lock(out, "convert"):  # processes starting together convert once
        if not os.path.exists(os.path.join(converted, "config.json")):
            from valley_jax import convert
            log.info("converting %s into %s", path, converted)
            convert.from_valley(path, converted)
    return converted


def open_model(path: str, dtype: str):
    """(model, tokenizer) of a valley_jax checkpoint, in `dtype` ('auto': bfloat16 on an
    accelerator, float32 on the CPU)."""
    import jax
    import jax.numpy as jnp

    from valley_jax import checkpoint
    from valley_jax.data.text import load_tokenizer
    from valley_jax.layers import Policy

    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    policy = Policy(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    tokenizer_dir = checkpoint.tokenizer_dir(path)
    if tokenizer_dir is None:
        raise EvaluationError(f"{path}: the checkpoint has no tokenizer")
    return checkpoint.load_model(path, policy), load_tokenizer(tokenizer_dir)


def data_config(model_cfg, args, tokenizer_dir: str = ""):
    """Frames as training loads them, at the checkpoint's image size and number of frames."""
    from valley_jax.chat import resize_size_for
    from valley_jax.data.config import DataConfig, DatasetSpec

    size = model_cfg.vision.image_size
    return DataConfig(datasets=(DatasetSpec(path=args.questions),), tokenizer_path=tokenizer_dir,
                      num_frames=args.num_frames or model_cfg.num_frames,
                      frame_mode=args.frame_mode, image_size=size,
                      resize_size=args.resize_size or resize_size_for(size),
                      num_patches=model_cfg.vision.num_patches, shuffle=False, num_epochs=1,
                      num_workers=0)


# ---------------------------------------------------------------------------------------------
# Predictions


def prediction_path(out: str, index: int, count: int) -> str:
    name = "predictions.jsonl" if count == 1 else f"predictions-{index:03d}-of-{count:03d}.jsonl"
    return os.path.join(out, name)


def read_predictions(out: str) -> dict[str, dict]:
    """Every prediction in OUT's prediction files, by id (complete lines only: another process
    may be writing its file)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(out, "predictions*.jsonl"))):
        with open(path, "rb") as f:
            data = f.read()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            if line.strip():
                record = json.loads(line)
                found.setdefault(record["id"], record)
    return found


def _record(item: dict, pred: str | None, error: str | None = None) -> dict:
    record = {"id": item["id"], "question": item["text"], "answer": item["answer"], "pred": pred,
              "qtype": item["qtype"], "video": item["media_path"]}
    for key in ("pair", "slot"):
        if key in item:
            record[key] = item[key]
    if error:
        record["error"] = error
    return record


def predict_batch(answer_fn, items: list[dict]) -> list[dict]:
    """Prediction records for a batch; an unreadable video fails only its own item (the batch
    is then answered item by item to find it)."""
    try:
        return [_record(it, p) for it, p in zip(items, answer_fn(items))]
    except SkipRecord as err:
        if len(items) == 1:
            return [_record(items[0], None, str(err))]
    records = []
    for it in items:
        try:
            records.append(_record(it, answer_fn([it])[0]))
        except SkipRecord as err:
            records.append(_record(it, None, str(err)))
    return records


def run_predictions(items: list[dict], path: str, done: set[str], answer_fn, batch_size: int,
                    progress: bool = True) -> int:
    """Predicts the items whose ids are not in `done`, appending each batch's records to
    `path`. Returns how many it predicted."""
    from tqdm import tqdm

    pending = [it for it in items if it["id"] not in done]
    writer = judge_lib.JsonLines(path)  # repairs a line torn by an earlier crash
    try:
        with tqdm(total=len(items), initial=len(items) - len(pending), desc="predicting",
                  unit="item", disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                writer.append(predict_batch(answer_fn, chunk))
                bar.update(len(chunk))
    finally:
        writer.close()
    return len(pending)


# ---------------------------------------------------------------------------------------------
# Scoring


def judge_fields(fmt: str, items: list[dict], preds: dict[str, dict]) -> tuple[list, list]:
    """(keys, fields per judged unit): items, or for consistency the pairs of items."""
    if fmt != "vcg-consistency":
        return ([it["id"] for it in items],
                [{"question": it["text"], "answer": it["answer"], "pred": preds[it["id"]]["pred"]}
                 for it in items])
    pairs = collections.defaultdict(dict)
    for it in items:
        pairs[it["pair"]][it["slot"]] = it
    keys, fields = [], []
    for key, slots in pairs.items():
        if set(slots) == {1, 2}:  # --max-items may cut a pair
            keys.append(key)
            fields.append({"question1": slots[1]["text"], "question2": slots[2]["text"],
                           "answer": slots[1]["answer"], "pred1": preds[slots[1]["id"]]["pred"],
                           "pred2": preds[slots[2]["id"]]["pred"]})
    return keys, fields


def judge_items(args, client: judge_lib.JudgeClient, tasks: dict, items: list[dict],
                preds: dict[str, dict]) -> tuple[dict, list[dict]]:
    """({task: figures}, per-unit verdict records)."""
    from tqdm import tqdm

    task_names = VCG.get(args.format, ("qa",))
    keys, fields = judge_fields(args.format, items, preds)
    figures, records = {}, []
    for name in task_names:
        task = tasks[name]
        with tqdm(total=len(fields), desc=f"judging {name}", unit="item",
                  disable=not args.progress, file=sys.stderr) as bar:
            verdicts = client.judge_all(task, fields, workers=args.judge_workers,
                                        progress=bar.update)
        figures[name] = judge_lib.summarise(verdicts, task)
        if name == "qa":
            by_type = collections.defaultdict(list)
            for it, v in zip(items, verdicts):
                by_type[it["qtype"]].append(v)
            if set(by_type) != {"all"}:
                figures["qa_by_qtype"] = {t: judge_lib.summarise(vs, task)
                                          for t, vs in sorted(by_type.items())}
        records += [{"id": k, "task": name, "pred": v.pred, "score": v.score,
                     "replies": list(v.replies)} for k, v in zip(keys, verdicts)]
    return figures, records


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for package in ("jax", "jaxlib", "flax", "transformers", "valley_jax"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    try:  # the source the figures came from, when run from a checkout
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = "-dirty" if dirty.stdout.strip() else ""
            out["valley_jax_git"] = commit.stdout.strip() + dirty
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def score(args, argv: list[str], items: list[dict], preds: dict[str, dict], missing: int,
          generation: dict, root: str) -> dict:
    """results.json (and judgements.jsonl when judged) from complete predictions."""
    answered = [it for it in items if preds[it["id"]].get("pred") is not None]
    failed = [it["id"] for it in items if preds[it["id"]].get("pred") is None]
    results = {
        "command": "python -m valley_jax.evaluate " + shlex.join(argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "checkpoint": os.path.abspath(args.checkpoint),
        "dataset": {"format": args.format, "questions": os.path.abspath(args.questions),
                    "answers": os.path.abspath(args.answers) if args.answers else None,
                    "media_root": os.path.abspath(root),
                    "max_items": args.max_items, "items": len(items), "answered": len(answered),
                    "failed": len(failed), "missing_videos": missing},
        "generation": generation,
        "predictions": sorted(glob.glob(os.path.join(os.path.abspath(args.out),
                                                      "predictions*.jsonl"))),
        # The offline metric: normalised exact and contains match, per question type.
        "offline": qa.accuracy(answered, [preds[it["id"]]["pred"] for it in answered]),
        "judge": None,
        "judged": None,
    }
    if failed:
        results["dataset"]["failed_ids"] = failed[:100]
    if args.judge_url:
        tasks = judge_lib.load_tasks(args.judge_prompts)
        settings = {"temperature": args.judge_temperature}
        if args.judge_max_tokens:
            settings["max_tokens"] = args.judge_max_tokens
        client = judge_lib.JudgeClient(
            args.judge_url, args.judge_model, api_key=os.environ.get(args.judge_key_env),
            settings=settings, cache_path=args.judge_cache or os.path.join(args.out,
                                                                           "judge_cache.jsonl"),
            max_attempts=args.judge_retries, parse_attempts=args.judge_parse_attempts,
            timeout_s=args.judge_timeout)
        figures, records = judge_items(args, client, tasks, answered, preds)
        results["judge"] = {**client.describe(), "key_env": args.judge_key_env,
                            "prompts": args.judge_prompts or "valley_jax.judge.TASKS",
                            "prompts_digest": judge_lib.tasks_digest(tasks),
                            "requests": client.requests}
        results["judged"] = figures
        judgements = os.path.join(args.out, "judgements.jsonl")
        with open(judgements + ".tmp", "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(judgements + ".tmp", judgements)
        client.cache.close()
    _write_json_atomic(os.path.join(args.out, "results.json"), results)
    return results


# ---------------------------------------------------------------------------------------------
# The run


def _process(args) -> tuple[int, int]:
    if (args.process_index is None) != (args.process_count is None):
        raise EvaluationError("--process-index and --process-count go together")
    if args.process_count is not None:
        if not 0 <= args.process_index < args.process_count:
            raise EvaluationError("need 0 <= --process-index < --process-count")
        return args.process_index, args.process_count
    import jax

    from valley_jax.train import maybe_initialize_distributed
    maybe_initialize_distributed()
    return jax.process_index(), jax.process_count()


def _check_run(out: str, run: dict) -> None:
    """OUT/run.json pins what the predictions in OUT come from: a rerun that would mix
    predictions of another checkpoint, dataset or generation setting is refused."""
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = sorted(k for k in set(before) | set(run) if before.get(k) != run.get(k))
        if changed:
            raise EvaluationError(f"{out} holds predictions of another run (differs in "
                                  f"{', '.join(changed)}); use another --out or delete it")
    else:
        _write_json_atomic(path, run)


@contextlib.contextmanager
def _lock(out: str, name: str):
    """One process at a time in the block, across processes sharing OUT."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f".{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(args, argv: list[str]) -> dict | None:
    """Predicts this process's share, then scores if every item has a prediction. Returns the
    results, or None when other processes still have items to predict."""
    os.makedirs(args.out, exist_ok=True)
    items, root, missing = load_items(args)
    check_unique(items)
    if not items:
        raise EvaluationError("no items to evaluate")
    index, count = _process(args)
    from valley_jax import checkpoint
    ckpt = resolve_checkpoint(args.checkpoint, args.out)
    dcfg = data_config(checkpoint.load_config(ckpt), args)
    generation = {"prompt": "legacy" if args.legacy else "v1", "greedy": True,
                  "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                  "num_frames": dcfg.num_frames, "frame_mode": dcfg.frame_mode,
                  "image_size": dcfg.image_size, "resize_size": dcfg.resize_size,
                  "dtype": args.dtype}
    pinned = {k: v for k, v in generation.items() if k != "batch_size"}
    _check_run(args.out, {"checkpoint": os.path.abspath(args.checkpoint), "format": args.format,
                          "questions": os.path.abspath(args.questions),
                          "answers": args.answers and os.path.abspath(args.answers),
                          "media_root": os.path.abspath(root), **pinned})

    mine = items[index::count]
    done = set(read_predictions(args.out))
    if not args.score_only and any(it["id"] not in done for it in mine):
        model, tokenizer = open_model(ckpt, args.dtype)

        def answer_fn(chunk):
            return qa.answer(model, tokenizer, chunk, dcfg, root, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, legacy=args.legacy)

        predicted = run_predictions(mine, prediction_path(args.out, index, count), done,
                                    answer_fn, args.batch_size, args.progress)
        log.info("process %d of %d: %d predicted, %d were done", index, count, predicted,
                 len(mine) - predicted)
    if count > 1 and args.process_count is None:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("valley_jax.evaluate predictions")
        if index != 0:
            return None
    with _lock(args.out, "scoring"):  # finishing processes share the judge cache
        preds = read_predictions(args.out)
        left = [it["id"] for it in items if it["id"] not in preds]
        if left:
            log.info("%d items still lack predictions (other processes); the last process to "
                     "finish scores, or rerun with --score-only", len(left))
            if args.score_only:
                raise EvaluationError(f"--score-only: {len(left)} items have no prediction yet")
            return None
        return score(args, argv, items, preds, missing, generation, root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m valley_jax.evaluate",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--checkpoint", required=True,
                   help="valley_jax model checkpoint, or the authors' Hugging Face folder")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--questions", required=True, help="question (or Valley JSON) file")
    p.add_argument("--answers", help="answer file (msvd, msrvtt, activitynet, tgif)")
    p.add_argument("--video-dir", help="folder of the videos (valley: the media root)")
    p.add_argument("--out", required=True, help="folder for predictions and results.json")
    p.add_argument("--max-items", type=int, help="only the first N items (in file order)")
    p.add_argument("--allow-missing", action="store_true",
                   help="evaluate without the questions whose video is missing")
    g = p.add_argument_group("generation")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--num-frames", type=int, help="frames per video (default: the checkpoint's)")
    g.add_argument("--frame-mode", default="fixed", choices=("fixed", "fps"))
    g.add_argument("--resize-size", type=int,
                   help="short side before the centre crop (default: image size x 256/224)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on an accelerator, float32 on the CPU")
    g.add_argument("--legacy", action="store_true",
                   help="the authors' inference prompt and clean-up (default: template v1)")
    g = p.add_argument_group("processes")
    g.add_argument("--process-index", type=int, help="default: jax.process_index()")
    g.add_argument("--process-count", type=int, help="default: jax.process_count()")
    g.add_argument("--score-only", action="store_true",
                   help="predict nothing; score the predictions in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g = p.add_argument_group("judge (any OpenAI-compatible chat completions endpoint)")
    g.add_argument("--judge-url", help="e.g. https://api.openai.com/v1; none: offline metric only")
    g.add_argument("--judge-model", help="a dated model name, e.g. gpt-3.5-turbo-0125")
    g.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (unset: no key sent)")
    g.add_argument("--judge-temperature", type=float, default=0.0)
    g.add_argument("--judge-max-tokens", type=int)
    g.add_argument("--judge-workers", type=int, default=4, help="requests in flight")
    g.add_argument("--judge-retries", type=int, default=6, help="tries per request")
    g.add_argument("--judge-parse-attempts", type=int, default=3,
                   help="requests per item until a reply parses")
    g.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--judge-prompts", help="JSON file replacing the judge's prompt templates")
    g.add_argument("--judge-cache", help="default: OUT/judge_cache.jsonl")
    return p


def _table(results: dict) -> str:
    lines = [f"{'qtype':<16}{'n':>7}{'exact':>9}{'contains':>10}"]
    for qtype, s in results["offline"].items():
        lines.append(f"{qtype:<16}{s['n']:>7}{s['exact']:>9.4f}{s['contains']:>10.4f}")
    for task, s in (results["judged"] or {}).items():
        if task != "qa_by_qtype":
            extra = f" accuracy {s['accuracy']}" if "accuracy" in s else ""
            lines.append(f"judge {task}: score {s['score']}{extra} "
                         f"({s['judged']} judged, {s['unparsable']} unparsable)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    """The command line; returns the results (None when other processes still predict)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.judge_url and not args.judge_model:
        raise SystemExit("error: --judge-url needs --judge-model")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run(args, argv)
    if results is not None:
        print(_table(results))
        print(f"results: {os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (EvaluationError, judge_lib.JudgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
