"""The README and the guides say what runs: every `m3d ...` line in their code blocks parses against the
real CLI (each option exists and takes the value shown), and the README's first-steps block runs as
written, line by line, in a fresh folder."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from m3d.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: The README block that the first-steps test runs, marked by this (invisible) comment before it.
FIRST_STEPS = "<!-- tested: first-steps -->"


def code_blocks(text: str) -> list[str]:
    """Shell code blocks (```bash, ```sh, or unlabelled), with backslash continuations joined."""
    return [b.replace("\\\n", " ") for b in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S)]


def m3d_commands(block: str) -> list[str]:
    """Each `m3d ...` command of a block: comments dropped, `&&` / `;` / `|` chains split, shell
    redirections (`> file`, `2>&1`) left to the shell."""
    found = []
    for line in block.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        for part in re.split(r"&&|;|\|", line):
            part = re.sub(r"\s(\d?>>?|<)\s*(&\d|\S+)", "", f" {part}").strip()
            if part.startswith("m3d "):
                found.append(part)
    return found


def documented() -> list[tuple[str, str]]:
    return [(doc.relative_to(ROOT).as_posix(), cmd) for doc in DOCS for block in code_blocks(doc.read_text())
            for cmd in m3d_commands(block)]


def test_the_docs_show_commands() -> None:
    """The collector itself finds what is there (an empty list would make the next test pass vacuously)."""
    readme = [cmd for doc, cmd in documented() if doc == "README.md"]
    assert any(c.startswith("m3d sync ") for c in readme) and any(c.startswith("m3d query ") for c in readme)


@pytest.mark.parametrize("doc,command", documented())
def test_every_documented_command_parses(doc: str, command: str) -> None:
    """Options that were renamed or removed, values a choice no longer takes, notation such as
    `[--repair]` that a user would paste: each fails here, naming the file and the line."""
    group = typer.main.get_command(app)
    args = shlex.split(command)[1:]
    while args and args[0].startswith("-"):  # the group's own options (-v)
        args.pop(0)
    ctx = group.context_class(group, info_name="m3d")
    sub = group.get_command(ctx, args[0])
    assert sub is not None, f"{doc}: `{command}`: no command {args[0]!r}"
    try:
        sub.make_context(args[0], args[1:], parent=ctx)
    except Exception as exc:  # click's usage errors: the message says what is wrong
        pytest.fail(f"{doc}: `{command}` does not parse: {exc}")


def test_the_readme_first_steps_run_as_written(tmp_path: Path) -> None:
    """The block a new user pastes first, run line by line in an empty folder: every line exits 0
    (`m3d serve` is left to its own tests: it runs until stopped)."""
    text = (ROOT / "README.md").read_text()
    assert FIRST_STEPS in text, "README has no first-steps block"
    block = code_blocks(text.split(FIRST_STEPS, 1)[1])[0]
    ran = 0
    for line in block.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line.startswith("m3d ") or line.startswith("m3d serve"):
            continue
        args = shlex.split(line)[1:]
        done = subprocess.run([sys.executable, "-m", "m3d.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"`{line}` exited {done.returncode}: {done.stderr[-2000:]}"
        ran += 1
    assert ran >= 4
