"""The scripted teacher of the demo: an MLLM/LLM stand-in that reads the synthetic figures.

For a policy the figures do not show (any policy but synth-shapes and its variants) it
answers from the product description in the prompt instead (:mod:`icm.demo.policy_teacher`).

:class:`TeacherServer` serves it on loopback with the OpenAI chat protocol: it answers
the data-generation prompts of :mod:`icm.policy.prompts` (the multi-question
description/explanation, the separate stages, the Q-A table) from what it reads in the
image (:func:`icm.demo.synth.read_figure`), and the moderation questions with logprobs
(an oracle for ``icm moderate --backend openai``). So ``icm data generate`` runs for real
against it. :func:`teacher_texts` are the texts it writes; :func:`synth_corpus` collects
the task's texts for a tiny model's tokenizer.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from icm.demo.policy_teacher import policy_reply, qa_request
from icm.demo.synth import (
    ACTIONS,
    COLOUR_WORD,
    EXPOSURE_WORD,
    EXPOSURES,
    REGION_NP,
    REGIONS,
    SYNTH_POLICY,
    Figure,
    check_synth_policy,
    general_instructions,
    read_figure,
)
from icm.policy import Policy, load_policy
from icm.policy.prompts_format import CHOICE_INSTRUCTION, YES_NO_INSTRUCTION, option_labels, option_letters

__all__ = ["Reply", "TeacherServer", "synth_corpus", "teacher_reply", "teacher_texts"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the teacher's texts


def _pick(options: list[str], key: str) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    return options[h % len(options)]


def _action_sentence(f: Figure) -> str:
    return {
        "still": "The figure stands still, with no glyph beside it.",
        "wave": "The cyan triangle beside it shows that the figure waves.",
        "touch": "The green cross beside it shows that the figure touches itself.",
    }[f.action]


def teacher_texts(f: Figure, policy: Policy | str = SYNTH_POLICY, key: str = "") -> tuple[str, str, str]:
    """The explicit content, implicit content and explanation the teacher writes for ``f``
    (the explanation opens with the term's verdict statement, as the prompts ask)."""
    pol = load_policy(policy) if isinstance(policy, str) else policy
    bg = _pick(["plain grey", "muted grey", "flat grey"], key + "bg")
    region = REGION_NP[f.region]
    region_text = {"upper": "The upper half of the body", "lower": "The lower half of the body", "whole": "The whole body"}[f.region]
    rest = "" if f.region == "whole" else ", while the other half is dark grey clothing"
    action = {
        "still": "There is no glyph beside the figure, so it stands still.",
        "wave": "A cyan triangle beside the figure shows that it waves.",
        "touch": "A green cross beside the figure shows that it touches itself.",
    }[f.action]
    explicit = (
        f"The image shows a simple figure with a round head and a rectangular body on a {bg} background. "
        f"{region_text} is painted {COLOUR_WORD[f.exposure]}, which marks it as "
        f"{EXPOSURE_WORD[f.exposure]}{rest}. {action}"
    )
    mood = {
        "covered": "calm and neutral, like a pictogram on a sign",
        "partial": "schematic, with the orange part drawing the eye",
        "bare": "stark, with the red part standing out at once",
    }[f.exposure]
    implicit = f"The picture feels {mood}. " + {
        "still": "Nothing happens in it; the figure simply stands.",
        "wave": "The triangle adds a friendly gesture to the scene.",
        "touch": "The cross gives the figure an intimate gesture.",
    }[f.action]
    if f.positive:
        explanation = (
            f"{pol.term.positive_statement}, because {region} of the figure is {EXPOSURE_WORD[f.exposure]} "
            f"({COLOUR_WORD[f.exposure]}). {_action_sentence(f)}"
        )
    else:
        explanation = (
            f"{pol.term.negative_statement}, because {region} of the figure, the marked part, is covered (blue) "
            f"and nothing is shown bare. {_action_sentence(f)}"
        )
    return explicit, implicit, explanation


_REGION_RE = re.compile(r"because the (upper half|lower half|whole body) of the figure", re.IGNORECASE)
_EXPOSURE_RE = re.compile(r"\((blue|orange|red)\)")


def _figure_from_explanation(text: str) -> tuple[Figure, bool] | None:
    """What an explanation the teacher wrote says (the Q-A stage sees text only)."""
    m, e = _REGION_RE.search(text), _EXPOSURE_RE.search(text)
    if not m or not e:
        return None
    region = {"upper half": "upper", "lower half": "lower", "whole body": "whole"}[m.group(1).lower()]
    exposure = {v: k for k, v in COLOUR_WORD.items()}[e.group(1).lower()]
    action = "touch" if "touches itself" in text else "wave" if "waves" in text else "still"
    positive = not re.search(r"\bis not\b", text.split(",")[0])
    return Figure(region, exposure, action), positive


def _qa_table(text: str, counts: dict[str, int], key: str, term_question: str = "Is the figure in the image revealing?") -> str:
    got = _figure_from_explanation(text)
    if got is None:
        return "The explanation does not say which part of the figure is marked, so no questions can be written."
    f, positive = got
    rng = random.Random(key)
    yes_no = [
        (term_question, positive),
        (f"Is {REGION_NP[f.region]} of the figure marked in colour?", True),
        (f"Is {REGION_NP[rng.choice([r for r in REGIONS if r != f.region])]} of the figure the marked part?", False),
        ("Does the figure touch itself?", f.action == "touch"),
        ("Is the marked part blue?", f.exposure == "covered"),
        ("Is the marked part red?", f.exposure == "bare"),
    ]
    choice_specs = [
        ("Which part of the figure is marked?", [REGION_NP[r] for r in REGIONS] + ["no part at all"], REGIONS.index(f.region)),
        ("What colour is the marked part?", ["blue", "orange", "red", "green"], EXPOSURES.index(f.exposure)),
        ("What does the figure do?", ["it stands still", "it waves", "it touches itself", "it sits down"], ACTIONS.index(f.action)),
        ("How bare is the marked part?", ["covered", "partly bare", "bare", "hidden"], EXPOSURES.index(f.exposure)),
        ("What is beside the figure?", ["nothing", "a cyan triangle", "a green cross", "a red circle"], ACTIONS.index(f.action)),
    ]
    what = [
        ("What colour is the marked part of the figure?", f"{COLOUR_WORD[f.exposure].capitalize()}."),
        ("What shows the action of the figure?", {"still": "Nothing: there is no glyph.", "wave": "A cyan triangle.", "touch": "A green cross."}[f.action]),
        ("What is the rest of the body?", "Dark grey clothing." if f.region != "whole" else "There is no rest: the whole body is marked."),
    ]
    how = [
        ("How is the exposure shown?", f"By the colour of the marked part: {COLOUR_WORD[f.exposure]} means {EXPOSURE_WORD[f.exposure]}."),
        ("How can the action be told?", "From the glyph beside the figure, or its absence."),
        ("How is the figure drawn?", "As a round head on a rectangular body."),
    ]
    rows = []
    for q, a in yes_no[: counts["yes_no"]]:
        rows.append(f"| yes/no | {q} | | {'Yes' if a else 'No'} |")
    for q, options, right in choice_specs[: counts["choice"]]:
        order = list(range(len(options)))
        rng.shuffle(order)
        letters = option_letters(len(options))
        cells = " ".join(f"{letters[i]}. {options[j][0].upper() + options[j][1:]}" for i, j in enumerate(order))
        rows.append(f"| choice | {q} | {cells} | {letters[order.index(right)]} |")
    for q, text in what[: counts["what"]]:
        rows.append(f"| what | {q} | | {text} |")
    for q, text in how[: counts["how"]]:
        rows.append(f"| how | {q} | | {text} |")
    return "| type | question | choices | answer |\n|---|---|---|---|\n" + "\n".join(rows)


def synth_corpus(policy: Policy | str = SYNTH_POLICY) -> list[str]:
    """Texts of the synthetic task (moderation prompts, instruction wordings, the teacher's
    descriptions, explanations and Q-A tables), to train a tiny model's tokenizer on, so
    the task's words are whole tokens as they would be with a real tokenizer."""
    from icm.data.instructions import DEFAULT_POOLS
    from icm.policy.prompts import attribute_prompts, term_prompt

    pol = load_policy(policy) if isinstance(policy, str) else policy
    texts = [term_prompt(pol).prompt] + [a.prompt for a in attribute_prompts(pol)]
    for pool in DEFAULT_POOLS.values():
        texts += [t.format(term=pol.term.id, question=pol.term.question, letters="A, B, C or D") for t in pool if t]
    texts += [turn["value"] for ex in general_instructions(200, seed=1) for turn in ex["conversations"]]
    counts = {"yes_no": 6, "choice": 5, "what": 3, "how": 3}
    for p in pol.products:
        f = Figure.of_product(pol, p.id)
        for k in range(3):
            explicit, implicit, explanation = teacher_texts(f, pol, f"{p.id}{k}")
            texts += [explicit, implicit, explanation, _qa_table(explanation, counts, f"{p.id}{k}", pol.term.question)]
    return texts


# --------------------------------------------------------------------------- answering requests


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", "input_text"))
    return ""


def _image_of(messages: list[dict[str, Any]]) -> Image.Image | None:
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for p in content:
            if isinstance(p, dict) and p.get("type") == "image_url":
                url = (p.get("image_url") or {}).get("url", "")
                if url.startswith("data:") and "," in url:
                    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    return None


@dataclass
class Reply:
    text: str
    logprobs: list[tuple[str, float]] | None = None


def _stage_table(policy: Policy) -> dict[str, str]:
    """Every data-generation prompt the policy compiles (any product's hint) -> its stage."""
    from icm.policy.prompts import explanation_prompt, stage_prompts

    table = {explanation_prompt(policy): "explanation"}
    for p in policy.products:
        sp = stage_prompts(policy, p)
        table.update({sp.combined: "combined", sp.explicit: "explicit", sp.implicit: "implicit", sp.explanation: "explanation"})
    return table


_STAGES: dict[tuple[str, str], dict[str, str]] = {}


def _is_synth(policy: Policy) -> bool:
    """Whether the drawings of :mod:`icm.demo.synth` show ``policy``'s products."""
    try:
        check_synth_policy(policy)
    except ValueError:
        return False
    return True


def teacher_reply(policy: Policy, messages: list[dict[str, Any]]) -> Reply:
    """What the scripted teacher answers to a chat request (see the module docstring).

    Requests are recognised by the prompts the policy compiles (:mod:`icm.policy.prompts`),
    so a rewording there needs no change here; the image is read from its pixels.
    """
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    prompt = _text_of(last_user.get("content")) if last_user else ""
    image = _image_of(messages)
    if not _is_synth(policy):  # any other policy: written from the product description in the prompt
        text, lps = policy_reply(policy, prompt, None if image is None else image.tobytes())
        return Reply(text, lps)
    term = policy.term
    if image is None:
        if (qa := qa_request(prompt)) is not None:
            explanation, counts = qa
            return Reply(_qa_table(explanation.strip(), counts, hashlib.sha256(explanation.encode()).hexdigest(), term.question))
        return Reply("There is no image to describe in this request.")
    f = read_figure(image)
    if f is None:
        return Reply("The image does not show one of the synthetic figures, so it cannot be described here.")
    key = hashlib.sha256(image.tobytes()).hexdigest()[:16]
    explicit, implicit, explanation = teacher_texts(f, policy, key)
    if prompt.rstrip().endswith(YES_NO_INSTRUCTION):
        yes = f.positive
        return Reply("Yes" if yes else "No", [("Yes", math.log(0.99) if yes else math.log(0.01)),
                                              ("No", math.log(0.01) if yes else math.log(0.99))])
    if prompt.rstrip().endswith(CHOICE_INSTRUCTION):
        for attr in policy.attributes:
            if prompt.startswith(attr.question):
                value = f.assignment.get(attr.id)
                letters = option_labels(len(attr.values))  # moderation questions: as icm moderate asks
                right = attr.value_ids.index(value) if value in attr.value_ids else 0
                lps = [(letter, math.log(0.97) if i == right else math.log(0.03 / (len(letters) - 1)))
                       for i, letter in enumerate(letters)]
                return Reply(letters[right], lps)
        return Reply("A")
    cache_key = (policy.name, policy.version)
    if cache_key not in _STAGES:
        _STAGES[cache_key] = _stage_table(policy)
    stage = _STAGES[cache_key].get(prompt.strip())
    if stage == "combined":
        return Reply(f"1. Explicit content: {explicit}\n\n2. Implicit content: {implicit}\n\n3. {explanation}")
    if stage == "implicit":
        return Reply(implicit)
    if stage == "explanation":
        return Reply(explanation)
    return Reply(explicit)


def _words(text: str) -> int:
    return len(text.split())


class TeacherServer:
    """The scripted teacher on ``http://127.0.0.1:PORT/v1`` (OpenAI chat completions), for
    ``policy``: the figure reader for synth-shapes, the product-description writer of
    :mod:`icm.demo.policy_teacher` for any other policy.

    Loopback only and bounded: request bodies over ``max_body`` bytes are refused (413),
    at most ``max_concurrency`` requests are answered at once (others wait), and
    :meth:`serve_until_idle` stops after ``idle_timeout`` seconds without a request. Use
    it as a context manager (a background thread) or call :meth:`serve_until_idle`.
    """

    def __init__(
        self,
        policy: Policy | str = SYNTH_POLICY,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "icm-synth-teacher",
        max_body: int = 32 << 20,
        max_concurrency: int = 16,
    ) -> None:
        self.policy = load_policy(policy) if isinstance(policy, str) else policy
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the teacher serves on loopback only")
        self.model = model
        self.max_body = max_body
        self.requests = 0
        self.last_request = time.monotonic()
        self._sem = threading.BoundedSemaphore(max_concurrency)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:  # quiet
                log.debug("teacher: " + fmt, *args)

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") in ("/v1/models", "/models"):
                    self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                outer.last_request = time.monotonic()
                if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > outer.max_body:
                    self._send(413, {"error": {"message": f"request body over {outer.max_body} bytes"}})
                    self.close_connection = True
                    return
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                    messages = body["messages"]
                except (ValueError, KeyError, TypeError):
                    self._send(400, {"error": {"message": "expected a JSON body with messages"}})
                    return
                with outer._sem:
                    try:
                        reply = teacher_reply(outer.policy, messages)
                    except Exception as exc:  # noqa: BLE001 - a bad request must not kill the server
                        self._send(400, {"error": {"message": f"{type(exc).__name__}: {exc}"}})
                        return
                with outer._lock:
                    outer.requests += 1
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": reply.text},
                                          "finish_reason": "stop"}
                if reply.logprobs is not None and body.get("logprobs"):
                    top = [{"token": t, "logprob": lp} for t, lp in reply.logprobs]
                    token, logprob = max(reply.logprobs, key=lambda x: x[1])
                    choice["logprobs"] = {"content": [{"token": token, "logprob": logprob, "top_logprobs": top}]}
                prompt_words = sum(_words(_text_of(m.get("content"))) for m in messages)
                self._send(200, {
                    "id": f"chatcmpl-{outer.requests}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", outer.model), "choices": [choice],
                    "usage": {"prompt_tokens": prompt_words, "completion_tokens": _words(reply.text),
                              "total_tokens": prompt_words + _words(reply.text)},
                })

        return Handler

    def start(self) -> TeacherServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="icm-synth-teacher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def serve_until_idle(self, idle_timeout: float | None = None) -> None:
        """Serve in this thread until Ctrl-C or ``idle_timeout`` seconds without a request."""
        self.start()
        try:
            while True:
                time.sleep(0.2)
                if idle_timeout is not None and time.monotonic() - self.last_request > idle_timeout:
                    return
        finally:
            self.stop()

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
