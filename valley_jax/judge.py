"""Judging open-ended answers with a chat model, by the protocol video LLMs are compared with.

Zero-shot video QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA, TGIF-QA): the judge sees the question,
the correct answer and the prediction, and replies with a Python dict `{'pred': 'yes'|'no',
'score': 0..5}`; accuracy is the share of 'yes', score the mean. Video-ChatGPT's benchmark asks
for `{'score': 0..5}` on five axes: correctness of information, detail orientation, contextual
understanding, temporal understanding (each from one question and answer) and consistency
(two phrasings of one question, their two predictions, one answer).

The prompts below restate the protocol of Video-ChatGPT's quantitative evaluation (Maaz et al.,
2023): the same roles, instructions, fields and reply format, in our own words. Judge figures
move with any wording, so `load_tasks` reads replacement templates from a JSON file (e.g. the
published wording, word for word) and every result records the templates' digest.

Any OpenAI-compatible endpoint serves as the judge (`POST {url}/chat/completions`). Transport
failures (connection errors, timeouts, HTTP 408/409/429/5xx) are retried with exponential
back-off, a bounded number of times. A reply that is not the asked-for dict is asked again
(attempt 1, 2, ...) and, if none parses, counted as unparsable: never guessed into a verdict.
Every reply is cached on disk under a digest of (judge model, settings, messages, attempt), so a
rerun replays the same replies without a single request.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Sequence

# ---------------------------------------------------------------------------------------------
# The tasks: what the judge is asked


@dataclasses.dataclass(frozen=True)
class Task:
    """One judging protocol: a system message, a user message template (str.format over the
    item's fields) and the keys the reply dict must have."""

    name: str
    system: str
    user: str
    keys: tuple[str, ...]  # ("pred", "score") or ("score",)

    def messages(self, fields: dict) -> list[dict]:
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.user.format(**fields)}]


_EVALUATOR = ("You are an intelligent chatbot that evaluates generative outputs for "
              "video-based question-answer pairs. ")
_PAIR = ("Please evaluate the following video-based question-answer pair:\n\n"
         "Question: {question}\nCorrect Answer: {answer}\nPredicted Answer: {pred}\n\n")


def _score_reply(what: str) -> str:
    return (f"Give your evaluation only as a {what} score: an integer from 0 to 5, where 5 is the "
            f"highest {what}. Write the reply as a Python dictionary string with the key 'score', "
            f"whose value is the {what} score as an INTEGER, not a STRING. DO NOT PROVIDE ANY "
            "OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. For "
            "example, your reply should look like this: {{'score': 4}}.")


def _axis(name: str, what: str, goal: str, instructions: Sequence[str]) -> Task:
    system = (_EVALUATOR + f"Your task is to compare the predicted answer with the correct answer "
              f"and {goal}. How to do it:\n------\n##INSTRUCTIONS:\n"
              + "".join(f"- {line}\n" for line in instructions))
    return Task(name, system.rstrip("\n"), _PAIR + _score_reply(what), ("score",))


TASKS: dict[str, Task] = {
    "qa": Task(
        "qa",
        _EVALUATOR + "Your task is to compare the predicted answer with the correct answer and "
        "decide whether they match in meaning. How to do it:\n------\n##INSTRUCTIONS:\n"
        "- Focus on whether the predicted answer and the correct answer mean the same thing.\n"
        "- Synonyms and paraphrases count as matches.\n"
        "- Judge the correctness of the prediction against the correct answer.",
        _PAIR + "Give your evaluation only as a yes/no and a score, where the score is an integer "
        "from 0 to 5 and 5 is the best match in meaning. Write the reply as a Python dictionary "
        "string with the keys 'pred' and 'score': the value of 'pred' is the string 'yes' or "
        "'no', the value of 'score' is an INTEGER, not a STRING. DO NOT PROVIDE ANY OTHER OUTPUT "
        "TEXT OR EXPLANATION. Only provide the Python dictionary string. For example, your reply "
        "should look like this: {{'pred': 'yes', 'score': 4}}.",
        ("pred", "score")),
    "correctness": _axis(
        "correctness", "factual accuracy", "decide whether they agree on the facts",
        ["Focus on factual agreement between the predicted and the correct answer: the "
         "prediction must contain no misreading and no misinformation.",
         "The predicted answer must be factually accurate and agree with the video's content.",
         "Synonyms and paraphrases count as matches.",
         "Judge the factual accuracy of the prediction against the correct answer."]),
    "detail": _axis(
        "detail", "detail orientation",
        "judge how detailed it is, in both completeness and specificity",
        ["Check that the predicted answer covers every major point of the video and leaves "
         "out no key aspect.",
         "Check that it gives specific details, tied to particular elements of the video, "
         "rather than generic statements.",
         "Synonyms and paraphrases count as matches.",
         "Give one score for the prediction's detail orientation, weighing completeness and "
         "specificity."]),
    "context": _axis(
        "context", "contextual understanding",
        "decide whether the prediction fits the overall context of the video",
        ["Judge whether the predicted answer fits the overall context of the video: nothing "
         "out of context or at odds with it.",
         "The predicted answer must capture the main themes and the mood of the video.",
         "Synonyms and paraphrases count as matches.",
         "Judge the prediction's contextual understanding against the correct answer."]),
    "temporal": _axis(
        "temporal", "temporal accuracy",
        "decide whether the prediction gets the order of events in the video right",
        ["Focus on temporal agreement: the predicted answer must give the events or details "
         "in the order the video shows them.",
         "Synonyms and paraphrases count as matches only if they keep the order of events.",
         "Judge the temporal accuracy of the prediction against the correct answer."]),
    "consistency": Task(
        "consistency",
        "You are an intelligent chatbot that evaluates the consistency of generative outputs for "
        "similar video-based question-answer pairs. You are given two very similar questions, "
        "one correct answer for both, and the predicted answers to each. Your task is to decide "
        "whether the two predictions are consistent with each other and with the correct answer. "
        "How to do it:\n------\n##INSTRUCTIONS:\n"
        "- Focus on consistency: both predicted answers should agree with the correct answer and "
        "with each other, without contradictions or notable differences in what they say.\n"
        "- Both predicted answers must convey the same information about the video as each other "
        "and as the correct answer.\n"
        "- Synonyms and paraphrases count as matches only if the information stays consistent.\n"
        "- Judge the consistency of the two predictions against the correct answer.",
        "Please evaluate the following video-based question-answer pair:\n\n"
        "Question 1: {question1}\nQuestion 2: {question2}\nCorrect Answer: {answer}\n"
        "Predicted Answer to Question 1: {pred1}\nPredicted Answer to Question 2: {pred2}\n\n"
        + _score_reply("consistency"),
        ("score",)),
}


def load_tasks(path: str | None) -> dict[str, Task]:
    """TASKS, with the templates a JSON file gives replacing ours: {task name: {"system": ...,
    "user": ...}} (user templates use the fields {question}, {answer}, {pred}; for consistency
    {question1}, {question2}, {answer}, {pred1}, {pred2}; literal braces doubled)."""
    tasks = dict(TASKS)
    if not path:
        return tasks
    with open(path) as f:
        override = json.load(f)
    for name, parts in override.items():
        if name not in tasks:
            raise ValueError(f"{path}: unknown judge task {name!r}; known: {sorted(tasks)}")
        unknown = set(parts) - {"system", "user"}
        if unknown:
            raise ValueError(f"{path}: task {name!r} has unknown parts {sorted(unknown)}")
        tasks[name] = dataclasses.replace(tasks[name], **parts)
    return tasks


def tasks_digest(tasks: dict[str, Task]) -> str:
    """A short digest of the templates, recorded with every judged result."""
    text = json.dumps({n: [t.system, t.user, t.keys] for n, t in sorted(tasks.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Replies


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The judge's verdict on one item: `pred` ('yes'/'no', for the QA task) and `score`, or
    neither when no reply parsed. `replies` are the raw replies, in the order received."""

    pred: str | None
    score: float | None
    replies: tuple[str, ...]

    @property
    def parsed(self) -> bool:
        return self.score is not None


_DICT = re.compile(r"\{.*\}", re.DOTALL)


def parse_reply(text: str, keys: Sequence[str]) -> tuple[str | None, float] | None:
    """(pred, score) from a reply holding one Python/JSON dict literal with `keys`, or None when
    it does not: pred must be 'yes' or 'no' (any case), score a number in [0, 5] (a numeric
    string is accepted, a bool is not). Text around the dict (e.g. a code fence) is ignored."""
    match = _DICT.search(text)
    if match is None:
        return None
    try:
        value = ast.literal_eval(match.group(0))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(value, dict) or not set(keys) <= set(value):
        return None
    score = value["score"]
    if isinstance(score, str):
        try:
            score = float(score.strip())
        except ValueError:
            return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 5:
        return None
    pred = None
    if "pred" in keys:
        pred = value["pred"].strip().lower() if isinstance(value["pred"], str) else None
        if pred not in ("yes", "no"):
            return None
    return pred, float(score)


def summarise(verdicts: Sequence[Verdict], task: Task) -> dict:
    """The figures of one task: n, judged, unparsable, score (mean) and, for QA, yes, no and
    accuracy (yes / judged). As the field computes it, a score counts as int(score)."""
    judged = [v for v in verdicts if v.parsed]
    out = {"n": len(verdicts), "judged": len(judged), "unparsable": len(verdicts) - len(judged),
           "score": sum(int(v.score) for v in judged) / len(judged) if judged else None}
    if "pred" in task.keys:
        yes = sum(v.pred == "yes" for v in judged)
        out.update(yes=yes, no=len(judged) - yes,
                   accuracy=yes / len(judged) if judged else None)
    return out


# ---------------------------------------------------------------------------------------------
# Crash-safe JSON lines (the reply cache here, the predictions in evaluate.py)


class JsonLines:
    """An append-only JSON-lines file that a crash cannot corrupt: each record is one unbuffered
    write (a batch is fsynced together) and, on opening, a torn last line (the write a crash cut
    short) is cut off, so at most that one record is lost."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[dict] = []
        self._file = None
        self._lock = threading.Lock()
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        for number, line in enumerate(complete.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                self.records.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err}); this file is written only "
                                 "whole lines at a time, so something else changed it") from None
        if len(complete) < len(data):
            with open(path, "r+b") as f:
                f.truncate(len(complete))

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        with self._lock:
            if self._file is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self._file = open(self.path, "ab", buffering=0)
            for record in records:  # one write per line: a crash tears one line at most
                self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
            os.fsync(self._file.fileno())
            self.records.extend(records)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class ReplyCache:
    """{key: reply entry}, in memory and, given a path, in a JsonLines file."""

    def __init__(self, path: str | None):
        self._file = JsonLines(path) if path else None
        records = self._file.records if self._file else []
        self._replies: dict[str, dict] = {r["key"]: r for r in records}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._replies.get(key)

    def put(self, key: str, entry: dict) -> None:
        entry = {"key": key, **entry}
        with self._lock:
            self._replies[key] = entry
        if self._file:
            self._file.append([entry])

    def close(self) -> None:
        if self._file:
            self._file.close()


# ---------------------------------------------------------------------------------------------
# The client


class JudgeError(RuntimeError):
    """The judge could not be reached (after the retries), or refused the request."""


RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


@dataclasses.dataclass
class JudgeClient:
    """A chat-completions client with retries and the reply cache.

    url: the endpoint's base (".../v1") or its full ".../chat/completions" address.
    settings: sent with every request and part of the cache key (temperature, max_tokens, ...).
    """

    url: str
    model: str
    api_key: str | None = None
    settings: dict = dataclasses.field(default_factory=lambda: {"temperature": 0.0})
    cache_path: str | None = None
    max_attempts: int = 6  # transport tries per request
    parse_attempts: int = 3  # requests per item until a reply parses
    backoff_s: float = 1.0  # first wait; doubles per retry
    max_backoff_s: float = 60.0
    timeout_s: float = 120.0
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self):
        url = self.url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.cache = ReplyCache(self.cache_path)
        self.requests = 0  # HTTP requests made (cache hits make none)
        self._count_lock = threading.Lock()
        # Asking is check-the-cache-then-post: two threads with the same prompt would both miss
        # and both post. A lock per stripe of keys makes the second wait and read the cache (256
        # stripes: unrelated prompts of a few workers rarely share one, and then only queue).
        self._key_locks = [threading.Lock() for _ in range(256)]
        self.served_models: set[str] = set()  # the `model` the endpoint says answered

    def describe(self) -> dict:
        """What a result records about its judge (never the key)."""
        return {"url": self.endpoint, "model": self.model, "settings": dict(self.settings),
                "served_models": sorted(self.served_models),
                "parse_attempts": self.parse_attempts}

    def cache_key(self, messages: list[dict], attempt: int) -> str:
        blob = json.dumps({"model": self.model, "settings": self.settings, "messages": messages,
                           "attempt": attempt}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def complete(self, messages: list[dict], attempt: int = 0) -> str:
        """The reply text to `messages` (the `attempt`-th time they are asked), from the cache
        or the endpoint."""
        key = self.cache_key(messages, attempt)
        with self._key_locks[int(key[:8], 16) % len(self._key_locks)]:
            return self._cached_or_asked(key, messages)

    def _cached_or_asked(self, key: str, messages: list[dict]) -> str:
        cached = self.cache.get(key)
        if cached is not None:
            if cached.get("served_model"):
                self.served_models.add(cached["served_model"])
            return cached["reply"]
        body = self._post({"model": self.model, "messages": messages, **self.settings})
        try:
            reply = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise JudgeError(f"{self.endpoint}: a response without choices[0].message.content: "
                             f"{json.dumps(body)[:300]}") from err
        reply = reply if isinstance(reply, str) else ""
        served = body.get("model") if isinstance(body.get("model"), str) else None
        if served:
            self.served_models.add(served)
        self.cache.put(key, {"reply": reply, "served_model": served})
        return reply

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.max_attempts):
            if attempt:
                self.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            request = urllib.request.Request(self.endpoint, data=data, headers=headers,
                                             method="POST")
            with self._count_lock:
                self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode(errors="replace")
                if err.code not in RETRY_STATUS:
                    raise JudgeError(f"{self.endpoint}: HTTP {err.code}: {detail}") from None
                last = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, OSError, ValueError) as err:
                # Connection refused or reset, timeouts, a body that is not JSON.
                last = f"{type(err).__name__}: {err}"
        raise JudgeError(f"{self.endpoint}: no answer after {self.max_attempts} tries; "
                         f"last: {last}")

    def judge(self, task: Task, fields: dict) -> Verdict:
        """Asks until a reply parses (at most parse_attempts times)."""
        messages = task.messages(fields)
        replies = []
        for attempt in range(self.parse_attempts):
            replies.append(self.complete(messages, attempt))
            parsed = parse_reply(replies[-1], task.keys)
            if parsed is not None:
                return Verdict(parsed[0], parsed[1], tuple(replies))
        return Verdict(None, None, tuple(replies))

    def judge_all(self, task: Task, items: Sequence[dict], workers: int = 4,
                  progress: Callable[[int], None] | None = None) -> list[Verdict]:
        """Verdicts for many items (fields dicts), `workers` requests in flight; in order."""
        if workers <= 1:
            verdicts = []
            for fields in items:
                verdicts.append(self.judge(task, fields))
                if progress:
                    progress(1)
            return verdicts
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self.judge, task, fields) for fields in items]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()  # the first failure stops the rest (the cache keeps the done)
                    if progress:
                        progress(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            return [f.result() for f in futures]
