"""The judge client against a real HTTP server on 127.0.0.1 speaking the chat completions API:
exact accuracy and score, retries (transport and unparsable replies), the cache, errors."""

import http.server
import json
import re
import socket
import threading

import pytest

from valley_jax import judge


class FakeJudge:
    """An OpenAI-compatible chat completions server answering from a table keyed by the
    predicted answer in the prompt (or a function of the user message). A table entry is a
    reply, or a list of replies given in turn (the last repeating); an int in it is answered as
    that HTTP status. Counts requests.
    Serves for at most `max_requests` requests, on 127.0.0.1 only, and stops with the test."""

    def __init__(self, table: dict, served_model: str = "judge-2024-06-01", max_requests=200):
        self.table, self.served_model, self.max_requests = table, served_model, max_requests
        self.requests, self.bodies, self.headers = 0, [], []
        self._stop = False
        self._seen = {}
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, reply = outer.answer(self.path, dict(self.headers), body)
                data = json.dumps(reply if status != 200 else {
                    "id": "x", "object": "chat.completion", "model": outer.served_model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while not self._stop and self.requests < self.max_requests:  # bounded
            self.server.handle_request()

    def answer(self, path, headers, body):
        with self._lock:
            self.requests += 1
            self.bodies.append(body)
            self.headers.append(headers)
            if path != "/v1/chat/completions":
                return 404, {"error": "not found"}
            user = body["messages"][-1]["content"]
            pred = re.search(r"Predicted Answer(?: to Question 1)?: (.*)", user).group(1)
            entry = self.table(user) if callable(self.table) else self.table[pred]
            if isinstance(entry, list):
                n = self._seen.get(pred, 0)
                self._seen[pred] = n + 1
                entry = entry[min(n, len(entry) - 1)]
        if isinstance(entry, int):
            return entry, {"error": {"message": f"status {entry}"}}
        return 200, entry

    def __enter__(self):
        self.server.timeout = 0.1  # handle_request returns this often to see the stop flag
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self.thread.join(timeout=10)
        self.server.server_close()


QA_TABLE = {
    "a cat": "{'pred': 'yes', 'score': 5}",
    "a dog": "{'pred': 'no', 'score': 1}",
    "a cow": "```python\n{'pred': 'Yes', 'score': 4.8}\n```",  # fenced, float: counts as 4
    "garbage": "It is probably right.",  # never a dict: unparsable after every attempt
    "flaky": [503, "{'pred': 'yes', 'score': 3}"],  # a transport error, then an answer
    "late": ["{'pred': 'maybe', 'score': 2}", '{"pred": "no", "score": 2}'],  # parses at try 2
}
QA_ITEMS = [{"question": "What is shown?", "answer": "a cat", "pred": p} for p in QA_TABLE]


def client(server, tmp_path, **kw):
    sleeps = []
    c = judge.JudgeClient(server.url, "judge-model", api_key="test-key",
                          settings={"temperature": 0.0, "max_tokens": 32},
                          cache_path=str(tmp_path / "cache.jsonl"), sleep=sleeps.append, **kw)
    return c, sleeps


def test_accuracy_score_retries_and_cache(tmp_path):
    with FakeJudge(QA_TABLE) as server:
        c, sleeps = client(server, tmp_path)
        verdicts = c.judge_all(judge.TASKS["qa"], QA_ITEMS, workers=3)
        figures = judge.summarise(verdicts, judge.TASKS["qa"])
        # cat yes 5, dog no 1, cow yes 4, flaky yes 3, late no 2; garbage unparsable.
        assert figures == {"n": 6, "judged": 5, "unparsable": 1, "score": 3.0, "yes": 3, "no": 2,
                           "accuracy": 0.6}
        assert [v.pred for v in verdicts] == ["yes", "no", "yes", None, "yes", "no"]
        assert verdicts[3].replies == ("It is probably right.",) * 3  # asked 3 times, no guess
        assert len(verdicts[5].replies) == 2
        # 1 + 1 + 1 + 3 (unparsable) + 2 (503 then answer) + 2 (unparsable then answer)
        assert server.requests == c.requests == 10
        assert sleeps == [1.0]  # one back-off, before the retry of the 503
        assert all(h["Authorization"] == "Bearer test-key" for h in server.headers)
        assert all(b["model"] == "judge-model" and b["temperature"] == 0.0 and
                   b["max_tokens"] == 32 for b in server.bodies)
        assert c.describe()["served_models"] == ["judge-2024-06-01"]

        # A rerun (a new client on the same cache file) makes no request at all.
        again, _ = client(server, tmp_path)
        verdicts2 = again.judge_all(judge.TASKS["qa"], QA_ITEMS, workers=1)
        assert server.requests == 10 and again.requests == 0
        assert verdicts2 == verdicts
        assert again.describe()["served_models"] == ["judge-2024-06-01"]

        # Other settings are another judge: asked anew.
        other = judge.JudgeClient(server.url, "judge-model", settings={"temperature": 0.5},
                                  cache_path=str(tmp_path / "cache.jsonl"))
        other.judge(judge.TASKS["qa"], QA_ITEMS[0])
        assert server.requests == 11


def test_identical_items_are_asked_once_however_many_workers(tmp_path):
    # Twelve items, three distinct: concurrent workers must not all miss the cache for one prompt.
    items = [QA_ITEMS[i % 3] for i in range(12)]
    with FakeJudge(QA_TABLE) as server:
        c, _ = client(server, tmp_path)
        seen = []
        verdicts = c.judge_all(judge.TASKS["qa"], items, workers=8, progress=seen.append)
        assert server.requests == c.requests == 3
        assert [v.pred for v in verdicts] == ["yes", "no", "yes"] * 4
        assert sum(seen) == 12


def test_benchmark_axes_and_consistency(tmp_path):
    table = {"sunny beach": "{'score': 4}", "a beach": "{'score': 2}", "rain": "{'score': 0}"}
    with FakeJudge(table) as server:
        c, _ = client(server, tmp_path)
        items = [{"question": "Where?", "answer": "a sunny beach", "pred": p} for p in table]
        for name in ("correctness", "detail", "context", "temporal"):
            figures = judge.summarise(c.judge_all(judge.TASKS[name], items), judge.TASKS[name])
            assert figures == {"n": 3, "judged": 3, "unparsable": 0, "score": 2.0}
        pair = {"question1": "Where?", "question2": "What place?", "answer": "a beach",
                "pred1": "sunny beach", "pred2": "a beach"}
        v = c.judge(judge.TASKS["consistency"], pair)
        assert (v.pred, v.score) == (None, 4.0)
        user = server.bodies[-1]["messages"][1]["content"]
        assert "Question 2: What place?" in user
        assert "Predicted Answer to Question 2: a beach" in user
        assert server.requests == 4 * 3 + 1  # each axis has its own prompt: each was asked


def test_errors_back_off_exponentially_then_fail(tmp_path):
    with FakeJudge({"x": 400, "y": 500}) as server:
        c, sleeps = client(server, tmp_path, max_attempts=4, backoff_s=0.5)
        item = {"question": "q", "answer": "a"}
        with pytest.raises(judge.JudgeError, match="HTTP 400"):  # a refusal is not retried
            c.judge(judge.TASKS["qa"], {**item, "pred": "x"})
        assert server.requests == 1 and sleeps == []
        with pytest.raises(judge.JudgeError, match="no answer after 4 tries"):
            c.judge(judge.TASKS["qa"], {**item, "pred": "y"})
        assert server.requests == 5 and sleeps == [0.5, 1.0, 2.0]
    # Nobody listening: connection errors are retried the same bounded way.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = []
    c = judge.JudgeClient(f"http://127.0.0.1:{port}/v1/chat/completions", "m", max_attempts=3,
                          sleep=sleeps.append, timeout_s=5)
    with pytest.raises(judge.JudgeError, match="no answer after 3 tries"):
        c.complete([{"role": "user", "content": "hi"}])
    assert sleeps == [1.0, 2.0] and c.requests == 3


def test_parse_reply():
    qa = ("pred", "score")
    assert judge.parse_reply("{'pred': 'yes', 'score': 4}", qa) == ("yes", 4.0)
    assert judge.parse_reply('Sure! {"pred": " NO ", "score": "3"}', qa) == ("no", 3.0)
    assert judge.parse_reply("{'score': 5}", ("score",)) == (None, 5.0)
    for bad in ("yes, 4", "{'pred': 'yes'}", "{'pred': 'maybe', 'score': 3}",
                "{'pred': 'yes', 'score': 7}", "{'pred': 'yes', 'score': True}",
                "{'pred': 'yes', 'score': 'high'}", "{'pred': yes, 'score': 4}", "[1, 2]"):
        assert judge.parse_reply(bad, qa) is None, bad


def test_torn_cache_line_is_dropped_and_the_file_stays_usable(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = judge.ReplyCache(str(path))
    cache.put("k1", {"reply": "{'score': 1}"})
    cache.put("k2", {"reply": "{'score': 2}"})
    with open(path, "ab") as f:
        f.write(b'{"key": "k3", "reply": "{\'sc')  # a crash in the middle of a write
    cache = judge.ReplyCache(str(path))
    assert cache.get("k1")["reply"] == "{'score': 1}" and cache.get("k3") is None
    cache.put("k3", {"reply": "{'score': 3}"})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["key"] for line in lines] == ["k1", "k2", "k3"]


def test_prompt_templates_can_be_replaced(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"qa": {"user": "Q={question} A={answer} P={pred}"}}))
    tasks = judge.load_tasks(str(path))
    assert tasks["qa"].messages({"question": "q", "answer": "a", "pred": "{p}"})[1] == {
        "role": "user", "content": "Q=q A=a P={p}"}
    assert tasks["qa"].system == judge.TASKS["qa"].system
    assert judge.tasks_digest(tasks) != judge.tasks_digest(judge.TASKS)
    path.write_text(json.dumps({"quality": {"user": "x"}}))
    with pytest.raises(ValueError, match="unknown judge task 'quality'"):
        judge.load_tasks(str(path))
