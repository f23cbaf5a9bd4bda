"""Hostile policy files: every one gives a FILE[:LINE] error, never a hang, a crash or a stall.

Each case here used to hang (a FIFO), take tens of seconds (an alias bomb) or end in a
RecursionError traceback (deep nesting) before the loader refused it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FIXTURES
from typer.testing import CliRunner

from icm.cli.main import app
from icm.policy import PolicyError, load_policy_file, parse_policy
from icm.policy.loader import MAX_ALIAS_EXPANSION, MAX_DEPTH, MAX_POLICY_BYTES

runner = CliRunner()
VALID = FIXTURES / "policies" / "unused_value.yaml"


def _alias_bomb() -> str:
    """289 bytes of nested aliases ("billion laughs"): 9^8 = 43 million strings once expanded."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _only_issue(exc: pytest.ExceptionInfo[PolicyError]) -> tuple[str | None, int | None, str]:
    assert len(exc.value.issues) == 1, str(exc.value)
    issue = exc.value.issues[0]
    return issue.file, issue.line, issue.message


def _issues_in_child(path: str | Path, timeout: float = 60) -> list[dict[str, object]]:
    """``load_policy_file(path)``'s issues, from a child process with 2 GiB of address space
    and a timeout: a regression of the cases below hangs or eats memory without bound, and
    must fail this test, not the suite or the machine."""
    code = textwrap.dedent(
        """
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from icm.policy import PolicyError, load_policy_file
        try:
            load_policy_file(sys.argv[1])
        except PolicyError as exc:
            print(json.dumps([{"file": i.file, "line": i.line, "message": i.message} for i in exc.issues]))
        else:
            print("[]")
        """
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path} as a policy did not return within {timeout:.0f} s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


# ----------------------------------------------------------------------------- not regular files


def test_a_fifo_is_refused_before_it_is_opened(tmp_path):
    """In children with a timeout: opened, the FIFO would block them forever."""
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    assert _issues_in_child(fifo) == [
        {"file": str(fifo), "line": None, "message": "not a regular file (a FIFO): a policy must be a YAML file"}
    ]
    try:
        cli = subprocess.run(
            [sys.executable, "-m", "icm.cli.main", "policy", "validate", str(fifo)],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("icm policy validate FIFO blocked")
    assert cli.returncode == 1, cli.stderr
    assert f"{fifo}: error: not a regular file (a FIFO)" in cli.stdout + cli.stderr


def test_devices_and_directories_are_refused(tmp_path):
    with pytest.raises(PolicyError) as exc:
        load_policy_file("/dev/null")
    assert _only_issue(exc) == ("/dev/null", None, "not a regular file (a character device): a policy must be a YAML file")
    # /dev/zero, read, never ends
    assert _issues_in_child("/dev/zero") == [
        {"file": "/dev/zero", "line": None, "message": "not a regular file (a character device): a policy must be a YAML file"}
    ]
    with pytest.raises(PolicyError, match=r"not a regular file \(a directory\)"):
        load_policy_file(tmp_path)


def test_a_symlink_to_a_policy_file_still_loads(tmp_path):
    link = tmp_path / "link.yaml"
    link.symlink_to(VALID)
    policy, _ = load_policy_file(link)
    assert policy.name == "tiny"


# ----------------------------------------------------------------------------- size


def test_a_file_over_the_size_cap_is_refused_without_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(VALID.read_text() + "#" * MAX_POLICY_BYTES)
    with pytest.raises(PolicyError) as exc:
        load_policy_file(big)
    file, _line, message = _only_issue(exc)
    assert file == str(big) and message.startswith("policy file too large:")
    assert f"at most {MAX_POLICY_BYTES:,}" in message
    with pytest.raises(PolicyError, match="policy document too large"):
        parse_policy(big.read_text(), "big.yaml")


def test_not_utf8_names_the_line(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"name: tiny\nterm: caf\xe9\n")
    with pytest.raises(PolicyError) as exc:
        load_policy_file(f)
    assert _only_issue(exc) == (str(f), 2, "not UTF-8 text (byte 20)")


# ----------------------------------------------------------------------------- aliases


def test_an_alias_bomb_is_refused_at_the_alias_that_breaks_the_budget(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text(_alias_bomb())
    assert f.stat().st_size < 400
    # a is 10 values; b's aliases add 9 x 10, c's 9 x 91, d's 9 x 820, e's 9 x 7381 (74,718
    # in all), and f's first alias another 66,430: past 100,000 on line 6, before any expansion
    assert _issues_in_child(f) == [{
        "file": str(f), "line": 6,
        "message": f"aliases expand the document by more than {MAX_ALIAS_EXPANSION:,} values (an alias bomb?); refused at alias *e",
    }]


def test_a_recursive_alias_is_refused(tmp_path):
    """Before, the duplicate-key walk followed the cycle for ever (10 GB in a minute)."""
    f = tmp_path / "loop.yaml"
    f.write_text("name: tiny\nterm: &t\n  id: bad\n  again: *t\n")
    assert _issues_in_child(f) == [
        {"file": str(f), "line": 4, "message": "alias *t refers to a value that contains it (a recursive alias)"}
    ]


def test_ordinary_aliases_still_work(tmp_path):
    """Anchors for shared rule lists are fine: the budget counts expansions, not the feature."""
    text = VALID.read_text().replace(
        "rule_sets:\n  - {name: strict, audience: everyone, default: violate, rules: [{products: [blue_circle], label: allow}]}",
        "rule_sets:\n"
        "  - {name: strict, audience: everyone, default: violate, rules: &shared [{products: [blue_circle], label: allow}]}\n"
        "  - {name: lenient, audience: adults, default: allow, rules: *shared}",
    )
    assert "*shared" in text
    f = tmp_path / "aliases.yaml"
    f.write_text(text)
    policy, _ = load_policy_file(f)
    assert [rs.name for rs in policy.rule_sets] == ["strict", "lenient"]
    assert policy.rule_sets[1].rules == policy.rule_sets[0].rules


# ----------------------------------------------------------------------------- nesting


@pytest.mark.parametrize("nested", ["[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000])
def test_deep_nesting_is_a_file_line_error_not_a_recursion_error(tmp_path, nested):
    f = tmp_path / "deep.yaml"
    f.write_text(f"name: tiny\nterm: {nested}\n")
    with pytest.raises(PolicyError) as exc:
        load_policy_file(f)
    assert _only_issue(exc) == (str(f), 2, f"nested more than {MAX_DEPTH} levels deep")
    result = runner.invoke(app, ["policy", "validate", str(f)])
    assert result.exit_code == 1 and not isinstance(result.exception, RecursionError)
    assert f"{f}:2: error: nested more than {MAX_DEPTH} levels deep" in result.output.replace("\n", "")


def test_moderate_refuses_a_fifo_policy_with_an_error(tmp_path):
    """`icm moderate --policy FIFO` ends with the loader's error, in a child with a timeout."""
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    image = Path(__file__).resolve().parents[1] / "examples" / "images" / "flower.jpg"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "icm.cli.main", "moderate", str(image), "--policy", str(fifo)],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("icm moderate --policy FIFO blocked")
    assert proc.returncode != 0
    assert "not a regular file (a FIFO)" in proc.stdout + proc.stderr
