"""A multi-turn conversation about one image, with the policy in the system prompt.

:class:`ChatSession` is the library layer of ``icm chat``; the CLI only reads lines and
renders what :meth:`ChatSession.handle` returns. A line is either a question (answered by
the model, streamed through ``on_token``) or a command:

* ``/image PATH``: talk about another image (the conversation starts over);
* ``/rules NAME``: apply another rule set of the policy (the conversation goes on);
* ``/verdict``: the structured moderation of the image (the engine, as ``icm moderate``);
  its result joins the system prompt, so "why is this flagged?" can refer to it;
* ``/reset``, ``/help``, ``/quit``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from icm.chat.streaming import ChatBackendError, ChatUnsupported, Sampling, TokenCallback, stream_reply
from icm.moderation.backends.base import Backend, Message
from icm.moderation.engine import Moderator
from icm.moderation.images import DEFAULT_MAX_PIXELS, ImageLoadError, LoadedImage, load_image
from icm.moderation.record import ModerationRecord
from icm.policy import Policy, load_policy
from icm.policy.model import RuleSet
from icm.prompting import chat_conversation

HELP = """\
Ask anything about the image. Commands:
  /image PATH   talk about another image (starts a new conversation)
  /rules NAME   switch to another rule set of the policy ({rule_sets})
  /verdict      run the structured moderation (verdict, product, rule, reason)
  /reset        forget the conversation so far
  /help         this text
  /quit         leave (also /exit, or end of input)"""

EventKind = Literal["answer", "verdict", "info", "error", "quit"]


@dataclass
class ChatEvent:
    """What one line of input produced."""

    kind: EventKind
    text: str = ""
    record: ModerationRecord | None = None
    interrupted: bool = False


def policy_context(policy: Policy, rule_set: RuleSet, verdict: ModerationRecord | None = None) -> str:
    """The system prompt: the policy, the active rule set's labels, the latest verdict."""
    labels = policy.labels(rule_set)
    violating = [f"{pid} ({lab.severity or 'medium'})" for pid, lab in labels.items() if lab.verdict == "violate"]
    allowed = [pid for pid, lab in labels.items() if lab.verdict == "allow"]
    lines = [
        "You are a content moderation assistant. You look at the image and answer questions about it, "
        f"applying the moderation policy '{policy.name}' (term: {policy.term.id}). The term's question is: "
        f"{policy.term.question}",
        "The policy describes an image by these attributes: "
        + "; ".join(f"{a.id} ({', '.join(a.value_ids)})" for a in policy.attributes)
        + ". A combination of attribute values is an attribute product.",
        f"Active rule set: '{rule_set.name}', for {rule_set.audience}."
        + (f" {rule_set.description}" if rule_set.description else ""),
        "Products this rule set treats as violations: " + (", ".join(violating) or "none") + ".",
        "Products it allows: " + (", ".join(allowed) or "none") + ".",
        "When you say an image violates the rules, name the product and the rule; be factual, "
        "describe only what is visible, and say when you are unsure.",
    ]
    if verdict is not None and verdict.ok:
        v = (
            f"The moderation engine's verdict on this image under '{verdict.rules}': {verdict.verdict}, "
            f"P(violation)={verdict.p_violation:.2f}"
            if verdict.p_violation is not None
            else f"The moderation engine's verdict on this image under '{verdict.rules}': {verdict.verdict}"
        )
        if verdict.product:
            v += f", product {verdict.product} ({verdict.product_description or ''}), rule: {verdict.rule}"
        lines.append(v + f". Reason: {verdict.reason}")
    return "\n".join(lines)


@dataclass
class ChatSession:
    """A conversation with ``backend`` about one image under a policy and rule set.

    ``verdict_backend`` (default: ``backend``) is what ``/verdict`` moderates with, e.g. the
    offline detector while the conversation runs on an MLLM.
    """

    backend: Backend
    policy: Policy | str = "icm-sexy"
    rules: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    verdict_backend: Backend | None = None
    explain_verdict: bool = False
    system_prompt: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if isinstance(self.policy, str):
            self.policy = load_policy(self.policy)
        self.rule_set: RuleSet = self.policy.rule_set(self.rules)
        self.rules = self.rule_set.name
        self.image: LoadedImage | None = None
        self.history: list[Message] = []
        self.last_verdict: ModerationRecord | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def _policy(self) -> Policy:
        assert isinstance(self.policy, Policy)
        return self.policy

    def system_message(self) -> str:
        if self.system_prompt is not None:
            return self.system_prompt
        return policy_context(self._policy, self.rule_set, self.last_verdict)

    def messages(self) -> list[Message]:
        """What the model sees next: the system prompt (none when empty) and the turns so far.

        Built by :mod:`icm.prompting`, as the backends build a scored question: with an
        empty system prompt, a moderation question asked here is the prompt it is scored
        and trained on.
        """
        return chat_conversation(self.system_message(), self.history)

    def open_image(self, path: str | Path) -> LoadedImage:
        """Switch to another image; raises ImageLoadError. The conversation starts over."""
        im = load_image(path, max_pixels=self.max_pixels)
        self.image = im
        self.history.clear()
        self.last_verdict = None
        return im

    def set_rules(self, name: str) -> RuleSet:
        """Apply another rule set; raises KeyError naming the known ones."""
        self.rule_set = self._policy.rule_set(name)
        self.rules = self.rule_set.name
        self.last_verdict = None  # a verdict under the old rules would mislead the model
        return self.rule_set

    def reset(self) -> None:
        self.history.clear()

    # -- model ---------------------------------------------------------------------------

    def ask(self, question: str, on_token: TokenCallback | None = None) -> ChatEvent:
        """Ask about the current image; the answer streams through ``on_token``."""
        if self.image is None:
            return ChatEvent("error", "no image: open one with /image PATH")
        pieces: list[str] = []

        def emit(piece: str) -> None:
            pieces.append(piece)
            if on_token is not None:
                on_token(piece)

        turn = {"role": "user", "content": question}
        try:
            text = stream_reply(self.backend, self.image.image, [*self.messages(), turn], self.sampling, emit)
        except KeyboardInterrupt:
            partial = "".join(pieces).strip()
            self.history += [turn, {"role": "assistant", "content": partial}]
            return ChatEvent("answer", partial, interrupted=True)
        except (ChatUnsupported, ChatBackendError, ValueError) as exc:
            return ChatEvent("error", str(exc))
        self.history += [turn, {"role": "assistant", "content": text}]
        return ChatEvent("answer", text)

    def verdict(self) -> ChatEvent:
        """The structured moderation of the current image under the active rule set."""
        if self.image is None:
            return ChatEvent("error", "no image: open one with /image PATH")
        mod = Moderator(
            self.verdict_backend or self.backend,
            policy=self._policy,
            rules=self.rule_set.name,
            explain=self.explain_verdict,
            max_new_tokens=self.sampling.max_new_tokens,
        )
        record = mod.moderate_loaded([self.image])[0]
        if not record.ok:
            return ChatEvent("error", record.error or "the moderation failed", record=record)
        self.last_verdict = record
        return ChatEvent("verdict", record.reason or "", record=record)

    # -- lines ---------------------------------------------------------------------------

    def help_text(self) -> str:
        return HELP.format(rule_sets=", ".join(r.name for r in self._policy.rule_sets))

    def handle(self, line: str, on_token: TokenCallback | None = None) -> ChatEvent:
        """One line of user input: a command or a question."""
        text = line.strip()
        if not text:
            return ChatEvent("info", "")
        if not text.startswith("/"):
            return self.ask(text, on_token)
        cmd, _, arg = text.partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        if cmd in ("/quit", "/exit", "/q"):
            return ChatEvent("quit")
        if cmd in ("/help", "/?"):
            return ChatEvent("info", self.help_text())
        if cmd == "/reset":
            self.reset()
            return ChatEvent("info", "conversation cleared")
        if cmd == "/verdict":
            return self.verdict()
        if cmd == "/rules":
            if not arg:
                names = ", ".join(r.name for r in self._policy.rule_sets)
                return ChatEvent("info", f"rule set: {self.rule_set.name} (available: {names})")
            try:
                rs = self.set_rules(arg)
            except KeyError as exc:
                return ChatEvent("error", str(exc.args[0]) if exc.args else str(exc))
            return ChatEvent("info", f"rule set: {rs.name} ({rs.audience})")
        if cmd == "/image":
            if not arg:
                return ChatEvent("error", "usage: /image PATH")
            try:
                path = shlex.split(arg)[0] if arg[0] in "'\"" else arg
            except ValueError:
                path = arg
            try:
                im = self.open_image(Path(path).expanduser())
            except ImageLoadError as exc:
                return ChatEvent("error", str(exc))
            return ChatEvent("info", f"image: {im.source} ({im.width}x{im.height}); new conversation")
        return ChatEvent("error", f"unknown command {cmd} (try /help)")
