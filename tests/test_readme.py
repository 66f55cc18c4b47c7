"""The README's commands stay true: CI runs exactly the test command the README gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    return dict(re.findall(r"<!-- (main|test)-command -->\s*```(?:sh|bash)\n(.+?)\n```", text, re.S))


def test_readme_gives_both_commands():
    commands = _commands()
    assert set(commands) == {"main", "test"}
    assert "graphopt demo" in commands["main"]
    for command in commands.values():
        assert "python3 -m venv" in command and "torch==" in command


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _commands()["test"].strip() in ci
