"""docs/cli.md is what the code's ``--help`` prints, as sqlite-utils keeps its CLI reference
with ``cog --check``."""

from __future__ import annotations

import difflib

from tests.cli_reference import COMMAND, DOC, render


def test_cli_reference_matches_the_code():
    expected = render()
    written = DOC.read_text() if DOC.exists() else ""
    diff = "".join(difflib.unified_diff(
        written.splitlines(keepends=True), expected.splitlines(keepends=True),
        "docs/cli.md", "the code's --help", n=1,
    ))
    assert written == expected, f"docs/cli.md is out of date: run `{COMMAND}`\n{diff[:4000]}"


def test_cli_reference_lists_every_command():
    text = render()
    from producer.cli import cli

    for name in cli.commands:
        assert f"## `producer {name}`" in text
    assert "## `worker`" in text and "Usage: worker [OPTIONS]" in text
