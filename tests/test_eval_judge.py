"""The LLM judge of explanation quality, against a scripted OpenAI-compatible server on loopback.

The server (http.server in a thread, ephemeral port on 127.0.0.1, shut down after the
module) answers each request according to a marker in the candidate explanation: a
markdown table, fenced JSON, criteria as columns, loose text, transient 500 / 429 then a
good answer, a reply with no scores, a partial reply, a permanent 400, a server that
stays down. Every request is bounded by the client's timeout and retry limit.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.meq import from_judge_results
from icm.evaluation.meq_judge import ExplanationPair, Judge, JudgeConfig, judge_messages, parse_judgement

runner = CliRunner()

REPLIES = {
    "table": "Here is my evaluation.\n\n| Criteria | Score |\n|---|---|\n| Accuracy | 90 |\n| Preciseness | 70 |\n"
             "| Comprehensiveness | 80 |\n| Fluency | 85 |\n\nThe candidate is close to the reference.",
    "json": 'Sure!\n```json\n{"accuracy": 60, "preciseness": "55", "comprehensiveness": 50.5, "fluency": "95/100", "rationale": "ok"}\n```\nDone.',
    "columns": "| Accuracy | Preciseness | Comprehensiveness | Fluency |\n|:--:|:--:|:--:|:--:|\n| 40 | 30 | 20 | 10 |",
    "text": "**Accuracy**: 80/100\nPreciseness - 7/10\nComprehensiveness score (0-100): 90\nFluency: 95",
    "garbage": "I am sorry, I cannot evaluate this explanation.",
    "partial": '{"scores": {"Accuracy": 70, "Fluency": 88}}',
    "flaky": '{"accuracy": 11, "preciseness": 12, "comprehensiveness": 13, "fluency": 14}',
    "429": '{"accuracy": 21, "preciseness": 22, "comprehensiveness": 23, "fluency": 24}',
}


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []


class _Handler(BaseHTTPRequestHandler):
    state: _State

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, payload: dict | str, headers: dict | None = None) -> None:
        data = (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        st = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with st.lock:
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            st.auth.append(self.headers.get("Authorization"))
            st.bodies.append(body)
        try:
            time.sleep(0.05)  # long enough for concurrent requests to overlap
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "no such route"}})
            case = re.search(r"CASE-(\w+)", body["messages"][-1]["content"]).group(1)
            with st.lock:
                st.calls[case] = n = st.calls.get(case, 0) + 1
            if case == "400":
                return self._send(400, {"error": {"message": "bad request: model not allowed"}})
            if case == "down":
                return self._send(503, {"error": {"message": "overloaded"}})
            if case == "flaky" and n == 1:
                return self._send(500, "internal error")
            if case == "429" and n == 1:
                return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
            reply = REPLIES[case]
            self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]})
        finally:
            with st.lock:
                st.in_flight -= 1


@pytest.fixture()
def server():
    state = _State()
    handler = type("H", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=5)


CASES = ["table", "json", "columns", "text", "garbage", "partial", "flaky", "429", "400", "down"]


def _pairs() -> list[ExplanationPair]:
    return [ExplanationPair(id=c, reference=f"The reference for {c}.", candidate=f"A candidate explanation. CASE-{c}") for c in CASES]


def test_parser_reads_tables_json_and_stray_text():
    assert parse_judgement(REPLIES["table"]).scores == {"accuracy": 90, "preciseness": 70, "comprehensiveness": 80, "fluency": 85}
    assert parse_judgement(REPLIES["json"]).scores == {"accuracy": 60, "preciseness": 55, "comprehensiveness": 50.5, "fluency": 95}
    assert parse_judgement(REPLIES["columns"]).scores == {"accuracy": 40, "preciseness": 30, "comprehensiveness": 20, "fluency": 10}
    assert parse_judgement(REPLIES["text"]).scores == {"accuracy": 80, "preciseness": 70, "comprehensiveness": 90, "fluency": 95}
    p = parse_judgement(REPLIES["partial"])
    assert p.scores["accuracy"] == 70 and p.scores["preciseness"] is None and "no score for preciseness, comprehensiveness" in p.error
    assert parse_judgement(REPLIES["garbage"]).empty and parse_judgement("").error == "empty reply"
    bad = parse_judgement('{"accuracy": 150, "preciseness": 10, "comprehensiveness": 10, "fluency": 10}')
    assert bad.scores["accuracy"] is None and "out of 0-100" in bad.error
    # the paper's own judgement table, with its odd spacing
    paper = "| Criteria        | Score |\n|-----------------|-------|\n| Accuracy        | 90    |\n| Preciseness     | 70    |\n" \
            "| Comprehensiveness| 80    |\n| Fluency         | 85    |"
    assert parse_judgement(paper).complete
    # the prompt is ours and carries both texts
    msgs = judge_messages("REF TEXT", "CAND TEXT", term="gambling")
    assert "REF TEXT" in msgs[-1]["content"] and "CAND TEXT" in msgs[-1]["content"] and "gambling" in msgs[-1]["content"]


def test_judge_concurrent_retries_failures_cache_and_resume(server, tmp_path, monkeypatch):
    state, url = server
    monkeypatch.setenv("ICM_JUDGE_API_KEY", "sk-test-secret")
    cfg = JudgeConfig(model="judge-1", base_url=url, concurrency=3, timeout=5, max_retries=2, backoff_base=0.01,
                      max_backoff=0.05, cache=tmp_path / "cache.sqlite")
    judge = Judge(cfg)
    try:
        results = judge.judge(_pairs())
    finally:
        judge.close()
    by = {r.id: r for r in results}
    assert by["table"].scores["accuracy"] == 90 and by["json"].scores["fluency"] == 95
    assert by["columns"].scores["fluency"] == 10 and by["text"].scores["preciseness"] == 70
    assert by["flaky"].scores["accuracy"] == 11 and by["flaky"].attempts == 2  # 500, then the answer
    assert by["429"].scores["accuracy"] == 21 and by["429"].attempts == 2
    assert by["400"].error.startswith("HTTP 400") and state.calls["400"] == 1  # a 4xx is not retried
    assert by["down"].error.startswith("HTTP 503") and state.calls["down"] == 3  # 1 try + 2 retries
    assert by["garbage"].error == "no score for accuracy, preciseness, comprehensiveness, fluency"
    assert 2 <= state.max_in_flight <= 3
    assert set(state.auth) == {"Bearer sk-test-secret"}
    assert all(b["model"] == "judge-1" and b["temperature"] == 0.0 for b in state.bodies)

    rep = from_judge_results(results, name="run", source="pairs", judge_model="judge-1")
    assert (rep.n_items, rep.n_complete, rep.n_partial, rep.n_failed) == (10, 6, 1, 3)
    assert {f.id for f in rep.failures} == {"garbage", "partial", "400", "down"}
    # the paper's mean counts a missing score as 0; the other leaves it out
    got = [90, 60, 40, 80, 70, 11, 21]
    assert rep.means["accuracy"] == pytest.approx(sum(got) / 10)
    assert rep.means_scored["accuracy"] == pytest.approx(sum(got) / 7)
    assert rep.missing == {"accuracy": 3, "preciseness": 4, "comprehensiveness": 4, "fluency": 3}
    assert "sk-test-secret" not in rep.model_dump_json()

    # resume: answered requests come from the cache, only the HTTP failures are asked again
    before = dict(state.calls)
    judge = Judge(cfg)
    try:
        again = judge.judge(_pairs())
    finally:
        judge.close()
    new = {k: state.calls[k] - before.get(k, 0) for k in state.calls}
    assert {k for k, v in new.items() if v} == {"400", "down"}
    assert sum(r.cached for r in again) == 8
    assert [r.scores for r in again if r.cached] == [r.scores for r in results if r.id not in ("400", "down")]


def test_cli_judge_with_two_line_files(server, tmp_path):
    _state, url = server
    ref = tmp_path / "ref.txt"
    cand = tmp_path / "cand.txt"
    ref.write_text("".join(f"{c}_1.jpg\nThe reference for {c}.\n" for c in ("table", "json", "garbage")) + "extra_9.jpg\nNo partner.\n")
    cand.write_text("".join(f"dir/{c}_1.jpg\nA candidate. CASE-{c}\n" for c in ("table", "json", "garbage")))
    args = ["eval", "meq", "--reference", str(ref), "--candidate", str(cand), "--judge-model", "judge-2", "--judge-base-url", url,
            "--cache", str(tmp_path / "c.sqlite"), "--concurrency", "2", "--retries", "1", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    meq = json.loads(r.stdout)["meq"]
    assert meq["mode"] == "judge" and meq["judge_model"] == "judge-2"
    assert (meq["n_items"], meq["n_complete"], meq["n_failed"]) == (3, 2, 1)
    assert meq["means"]["accuracy"] == pytest.approx((90 + 60) / 3)
    assert meq["unmatched_reference"] == 1 and meq["failures"][0]["id"] == "garbage_1"
    # a judge that never answers: every explanation fails, exit code 1, nothing zeroed silently
    cand2 = tmp_path / "cand2.txt"
    cand2.write_text("table_1.jpg\nCASE-400\n")
    r = runner.invoke(app, ["eval", "meq", "--reference", str(ref), "--candidate", str(cand2), "--judge-model", "j",
                            "--judge-base-url", url, "--no-cache", "--retries", "0"])
    assert r.exit_code == 1 and "HTTP 400" in r.output
    r = runner.invoke(app, ["eval", "meq", "--reference", str(ref)])
    assert r.exit_code == 2


def test_judgement_files_missing_scores_count_zero_and_are_reported(tmp_path):
    d = tmp_path / "judgements"
    d.mkdir()
    head = "{img}\n\nHuman content:\nThe accuracy of 3 people is fluent: 7.\n\nAlgorithm content:\nA model text.\n\nChatGPT evaluation:\n"
    (d / "a_1.txt").write_text(head.format(img="a_1.jpg") + "| Criteria | Score |\n|---|---|\n| Accuracy | 80 |\n| Preciseness | 60 |\n"
                               "| Comprehensiveness | 70 |\n| Fluency | 90 |\n")
    (d / "b_2.txt").write_text(head.format(img="b_2.jpg") + "| Criteria | Score |\n|---|---|\n| Accuracy | 40 |\n| Preciseness | 20 |\n"
                               "| Comprehensiveness | 30 |\n")  # no Fluency row
    (d / "c_3.txt").write_text(head.format(img="c_3.jpg") + "The judge refused.\n")
    r = runner.invoke(app, ["eval", "meq", "--judgements", str(d), "--no-offline", "--json"])
    assert r.exit_code == 0, r.output
    meq = json.loads(r.stdout)["meq"]
    assert (meq["n_items"], meq["n_complete"], meq["n_partial"], meq["n_failed"]) == (3, 1, 1, 1)
    assert meq["means"]["accuracy"] == pytest.approx(120 / 3) and meq["means"]["fluency"] == pytest.approx(90 / 3)
    assert meq["means_scored"]["fluency"] == 90 and meq["missing"]["fluency"] == 2
    # the human text's "accuracy ... 7" is not read as a score: only the judge's section is parsed
    assert {f["id"] for f in meq["failures"]} == {"b_2", "c_3"}
