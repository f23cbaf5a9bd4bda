"""`icm chat IMAGE`: a multi-turn conversation about an image; renders icm.chat.ChatSession."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, TextIO

import typer

from icm.cli import backend_options as bo
from icm.cli.common import print_error

VERDICT_STYLE = {"allow": "green", "review": "yellow", "block": "red"}


def _fmt(p: float | None) -> str:
    return "-" if p is None else f"{p:.3f}"


def render_verdict(record, out: TextIO) -> None:
    lo, hi = record.p_violation_range or (record.p_violation, record.p_violation)
    pv = _fmt(record.p_violation) if lo == hi else f"{_fmt(record.p_violation)} (between {_fmt(lo)} and {_fmt(hi)})"
    out.write(f"verdict: {str(record.verdict).upper()}  P(violation)={pv}  rules: {record.rules}\n")
    if record.term is not None and record.term.p_yes is not None:
        out.write(f"  term: {record.term.question} P(Yes)={_fmt(record.term.p_yes)}\n")
    if record.product:
        out.write(f"  product: {record.product} (p={_fmt(record.product_probability)}); rule: {record.rule} -> {record.label}\n")
    else:
        out.write(f"  product: not identified (not judged: {', '.join(record.not_judged) or '-'})\n")
    out.write(f"  reason: {record.reason}\n")
    if record.explanation:
        out.write(f"  explanation: {record.explanation}\n")
    for b in record.boxes:
        out.write(f"  box: {b.label} {b.score:.2f} at {[round(v) for v in b.box]}\n")


def chat(
    image: str = typer.Argument(..., help="The image to talk about."),
    backend: Annotated[
        str | None, typer.Option("--backend", "-b", help="A backend that generates text: hf or openai (detector: /verdict only).")
    ] = "hf",
    model: bo.ModelOpt = None,
    adapter: bo.AdapterOpt = None,
    base_url: bo.BaseUrlOpt = None,
    dtype: bo.DtypeOpt = None,
    device: bo.DeviceOpt = None,
    min_label_mass: bo.MinLabelMassOpt = None,
    text_confidence: bo.TextConfidenceOpt = None,
    guided_choice: bo.GuidedChoiceOpt = None,
    api_key_env: bo.ApiKeyEnvOpt = None,
    timeout: bo.TimeoutOpt = None,
    max_retries: bo.MaxRetriesOpt = None,
    policy: str = typer.Option("icm-sexy", "--policy", "-p", help="Built-in policy name or policy YAML file."),
    rules: str | None = typer.Option(None, "--rules", "-r", help="Rule set (default: the policy's default)."),
    temperature: float = typer.Option(0.0, help="0 (default) is greedy, deterministic decoding; above 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int | None = typer.Option(0, help="Sampling seed: the same seed gives the same answers."),
    max_new_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    verdict_backend: str | None = typer.Option(None, help="Backend for /verdict (default: the chat backend), e.g. detector."),
    explain: bool = typer.Option(False, "--explain", help="/verdict also asks the model for an explanation."),
    system: str | None = typer.Option(None, help="File whose text replaces the policy system prompt."),
) -> None:
    """Talk with a multimodal model about one image, under a policy and rule set."""
    from icm.chat import ChatSession, Sampling
    from icm.moderation.backends import BACKENDS
    from icm.moderation.images import ImageLoadError
    from icm.moderation.spec import BackendSpec, create_backend
    from icm.policy import PolicyError

    try:
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens)
        for name in (backend, verdict_backend):
            if name is not None and name not in BACKENDS:
                raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
        spec = BackendSpec.build(
            backend=backend, model=model, adapter=adapter, base_url=base_url, dtype=dtype, device=device, batch_size=1,
            min_label_mass=min_label_mass, text_confidence=text_confidence, guided_choice=guided_choice, api_key_env=api_key_env, timeout=timeout,
            max_retries=max_retries,
        )
        system_text = Path(system).read_text(encoding="utf-8") if system else None
        session = ChatSession(
            create_backend(spec), policy=policy, rules=rules, sampling=sampling,
            explain_verdict=explain, system_prompt=system_text,
        )
        if verdict_backend and verdict_backend != backend:
            session.verdict_backend = create_backend(spec, verdict_backend)
        im = session.open_image(image)
    except (ValueError, KeyError, PolicyError, ImageLoadError, ImportError, OSError) as exc:
        print_error(f"icm chat: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}")
        raise typer.Exit(2) from None

    out = sys.stdout
    interactive = sys.stdin.isatty()
    mode = "greedy" if sampling.greedy else f"temperature {sampling.temperature}, top-p {sampling.top_p}, seed {sampling.seed}"
    out.write(
        f"icm chat: {im.source} ({im.width}x{im.height}) | policy {session._policy.name}, rules {session.rule_set.name} | "
        f"{session.backend.name} {session.backend.model_id} | {mode}\n"
        "Type /help for commands, /quit to leave.\n"
    )
    out.flush()
    try:
        while True:
            try:
                if interactive:
                    line = input("you> ")
                else:
                    raw = sys.stdin.readline()
                    if not raw:
                        break
                    line = raw.rstrip("\n")
                    if line.strip():
                        out.write(f"you> {line}\n")
            except EOFError:
                break
            except KeyboardInterrupt:
                out.write("\n")
                break
            if line.strip() and not line.strip().startswith("/"):
                out.write("assistant> ")
                out.flush()

            def on_token(piece: str) -> None:
                out.write(piece)
                out.flush()

            event = session.handle(line, on_token=on_token)
            if event.kind == "quit":
                break
            if event.kind == "answer":
                out.write(" [interrupted]\n" if event.interrupted else "\n")
            elif event.kind == "verdict" and event.record is not None:
                render_verdict(event.record, out)
            elif event.kind == "error":
                if line.strip() and not line.strip().startswith("/"):
                    out.write("\n")
                out.write(f"error: {event.text}\n")
            elif event.text:
                out.write(event.text + "\n")
            out.flush()
    finally:
        session.backend.close()
        if session.verdict_backend is not None:
            session.verdict_backend.close()
