"""Loading policies from YAML with errors that name the file and the line."""

from __future__ import annotations

import functools
import os
import stat
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from icm.policy.model import Policy
from icm.policy.validate import Issue, Loc, PolicyError, check_policy

BUILTIN_PACKAGE = "icm.policies"

# Limits that a policy file, hostile or mistaken, cannot get past. The largest built-in
# policy is 16 KB, 7 levels deep and uses no alias: these leave room for a hundred times that.
MAX_POLICY_BYTES = 1 << 20
MAX_DEPTH = 64
# Values that aliases may add to the document, all uses together (each use counts the full
# size of what it names): a 300-byte "billion laughs" file otherwise expands to millions.
MAX_ALIAS_EXPANSION = 100_000


class _Refused(Exception):
    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.line = mark.line + 1 if mark is not None else None


class _BoundedLoader(yaml.SafeLoader):
    """A safe loader that refuses deep nesting and alias bombs while composing.

    PyYAML composes recursively (deep nesting ends in RecursionError) and shares aliased
    nodes, so a few hundred bytes of nested aliases become millions of values for whatever
    walks the data. Every node's expanded size is kept when it is complete, and each alias
    adds the size of what it names to a budget, so a bomb is refused at the alias that
    breaks the budget, before any of it is expanded.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                size = self._sizes.get(id(target))
                if size is None:
                    raise _Refused(f"alias *{event.anchor} refers to a value that contains it (a recursive alias)", event.start_mark)
                self._expanded += size
                if self._expanded > MAX_ALIAS_EXPANSION:
                    raise _Refused(
                        f"aliases expand the document by more than {MAX_ALIAS_EXPANSION:,} values "
                        f"(an alias bomb?); refused at alias *{event.anchor}", event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[id(c)] for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        else:
            size = 1
        self._sizes[id(node)] = size
        return node


def _line_of(root: yaml.Node | None, loc: Loc) -> int | None:
    """1-based line of the deepest node of ``loc`` that exists in the YAML tree."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    nxt = value
                    line = key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                nxt = node.value[part]
        if nxt is None:
            continue  # pydantic adds segments (union branches) that are not in the document
        node = nxt
        line = node.start_mark.line + 1
    return line


def _duplicate_keys(node: yaml.Node | None, file: str) -> list[Issue]:
    """PyYAML silently keeps the last of two equal keys; a policy author wants to know."""
    issues: list[Issue] = []
    stack = [node] if node is not None else []
    seen_nodes: set[int] = set()  # an aliased node is checked once, however often it is used
    while stack:
        n = stack.pop()
        if id(n) in seen_nodes:
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        issues.append(Issue("error", (), f"duplicate key {key.value!r}", file, key.start_mark.line + 1))
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return issues


def parse_policy(text: str, source: str = "<string>") -> tuple[Policy, list[Issue]]:
    """Parse and validate a policy document; returns the policy and its warnings.

    Raises :class:`PolicyError` listing every error as ``source:line: message``; refuses a
    document over :data:`MAX_POLICY_BYTES`, nested deeper than :data:`MAX_DEPTH` or whose
    aliases expand it by more than :data:`MAX_ALIAS_EXPANSION` values.
    """
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError([Issue("error", (), f"policy document too large: {len(text):,} characters (at most {MAX_POLICY_BYTES:,})", source)])
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        data: Any = loader.construct_document(root) if root is not None else None
    except _Refused as exc:
        raise PolicyError([Issue("error", (), exc.message, source, exc.line)]) from None
    except RecursionError:  # a belt: the loader bounds the depth before Python's stack does
        raise PolicyError([Issue("error", (), "nested too deeply", source)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([Issue("error", (), f"malformed YAML: {problem}", source, line)]) from None
    finally:
        loader.dispose()
    dupes = _duplicate_keys(root, source)
    if dupes:
        raise PolicyError(dupes)
    if not isinstance(data, dict):
        raise PolicyError([Issue("error", (), "a policy file must be a YAML mapping with name, term, attributes, products and rule_sets", source, 1)])

    def locate(issue: Issue) -> Issue:
        return Issue(issue.level, issue.loc, issue.message, source, _line_of(root, issue.loc))

    try:
        policy = Policy.model_validate(data)
    except PolicyError as exc:
        raise PolicyError([locate(i) for i in exc.issues]) from None
    except ValidationError as exc:
        issues = []
        for e in exc.errors():
            loc = tuple(e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            issues.append(locate(Issue("error", loc, msg)))
        raise PolicyError(issues) from None
    warnings = [locate(i) for i in check_policy(policy) if i.level == "warning"]
    return policy, warnings


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    """What a file is when it is not a regular file (None when it is one)."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def read_policy_text(path: str | Path) -> str:
    """The text of a policy file, refusing what is not a small regular UTF-8 file.

    A FIFO or a device is refused before it is opened (reading a FIFO blocks until a writer
    comes, forever); the file is then opened non-blocking and checked again, in case it was
    swapped between the check and the open, and read up to :data:`MAX_POLICY_BYTES`.
    """
    name = str(path)

    def fail(message: str) -> PolicyError:
        return PolicyError([Issue("error", (), message, name)])

    try:
        what = _not_regular(os.stat(path).st_mode)
        if what:
            raise fail(f"not a regular file ({what}): a policy must be a YAML file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise fail("no such file") from None
    except OSError as exc:
        raise fail(f"cannot read policy file: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        what = _not_regular(st.st_mode)
        if what:
            raise fail(f"not a regular file ({what}): a policy must be a YAML file")
        if st.st_size > MAX_POLICY_BYTES:
            raise fail(f"policy file too large: {st.st_size:,} bytes (at most {MAX_POLICY_BYTES:,})")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_POLICY_BYTES:  # st_size may be 0 (/proc) or stale: count what comes
            chunk = os.read(fd, MAX_POLICY_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise fail(f"cannot read policy file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_POLICY_BYTES:
        raise fail(f"policy file too large: more than {MAX_POLICY_BYTES:,} bytes")
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError([Issue("error", (), f"not UTF-8 text (byte {exc.start})", name, line)]) from None


def load_policy_file(path: str | Path) -> tuple[Policy, list[Issue]]:
    """Read, parse and validate a policy file (see :func:`read_policy_text` for what is refused)."""
    return parse_policy(read_policy_text(path), str(path))


def builtin_policy_names() -> list[str]:
    files = resources.files(BUILTIN_PACKAGE)
    return sorted(f.name[: -len(".yaml")] for f in files.iterdir() if f.name.endswith(".yaml"))


@functools.cache
def _builtin_policy(name: str) -> Policy:
    """A built-in policy, parsed once per process: the files do not change while it runs, a
    Policy is frozen, and a server with the taxonomy bundle loads each of them many times."""
    res = resources.files(BUILTIN_PACKAGE).joinpath(f"{name}.yaml")
    policy, _ = parse_policy(res.read_text(encoding="utf-8"), f"<builtin>/{name}.yaml")
    return policy


def load_policy(name_or_path: str | Path) -> Policy:
    """A built-in policy by name (``icm-sexy``) or a policy file by path."""
    name = str(name_or_path)
    if name in builtin_policy_names():
        return _builtin_policy(name)
    path = Path(name)
    if path.suffix.lower() in {".yaml", ".yml"} or path.exists():
        return load_policy_file(path)[0]
    known = ", ".join(builtin_policy_names())
    raise PolicyError([Issue("error", (), f"no built-in policy {name!r} and no such file (built-in: {known})", name)])


def policy_ref(ref: str) -> tuple[Policy, str]:
    """Parse ``POLICY[:RULESET]`` (e.g. ``icm-sexy:children``) into a policy and rule set name."""
    name, _, rules = ref.partition(":")
    policy = load_policy(name)
    rs = policy.rule_set(rules or None)
    return policy, rs.name
