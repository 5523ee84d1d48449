"""docs/WORKSHOP.md cannot rot: every command in its ```console blocks is run, and its output compared.

A block holds ``$ lab ...`` commands, each followed by the output it prints (stdout and stderr, as a
terminal shows them), and ``$ echo $?`` followed by the exit code of the command before. In the
expected output a line ``...`` stands for any number of lines and ``...`` inside a line for any text,
as in doctest; the first line of a check, which says which PostgreSQL was used, is written
``postgres: ...``; the line a lab prints when it removes schemas that killed labs left on the server
(``lab: removed ...``) depends on who shared the server before, so it is left out. Commands run in
order in one fresh directory (so ``lab exercise`` leaves the file ``lab check`` then reads) in which
``tests`` and ``fixes`` point into the repository.

``LAB_UPDATE_DOC=1`` rewrites the outputs from a real run; read the diff before committing it.
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lab.postgres.provision import Postgres

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "WORKSHOP.md"
BLOCK = re.compile(r"```console\n(.*?)```", re.S)
POSTGRES_LINE = re.compile(r"^postgres: .*$", re.M)


@dataclass
class Command:
    line: str
    expected: list[str] = field(default_factory=list)
    exit_code: int | None = None


def parse(block: str, program: str = "lab") -> list[Command]:
    """A block's commands of ``program`` (docs/PYTEST.md's are pytest's), each with its output and exit code."""
    commands: list[Command] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith("$ "), f"output before any command in a console block: {line!r}"
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        if line == "$ echo $?":
            assert commands and len(output) == 1, "`$ echo $?` follows a command and is followed by one number"
            commands[-1].exit_code = int(output[0])
            continue
        assert line.startswith(f"$ {program} "), f"only `{program}` commands (and `echo $?`) may appear: {line!r}"
        commands.append(Command(line[2:], output))
    return commands


def pattern(expected: list[str]) -> re.Pattern[str]:
    """The expected lines as a regex: a line '...' is any lines, '...' inside a line any text."""
    parts = []
    for line in expected:
        if line == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*".join(re.escape(piece) for piece in line.split("...")) + r"\n")
    return re.compile("".join(parts))


REAPED_LINE = re.compile(r"^lab: removed \d+ schemas? left by .* (is|are) gone .*$")


def normalise(output: str) -> str:
    lines = [line.rstrip() for line in output.splitlines() if not REAPED_LINE.match(line)]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


def run(command: Command, cwd: Path, dsn: str) -> tuple[int, str]:
    argv = shlex.split(command.line)
    env = {**os.environ, "LAB_DATABASE_URL": dsn, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lab.cli", *argv[1:]], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, check=False)
    return done.returncode, normalise(done.stdout)


def test_every_command_in_the_workshop_guide_prints_what_the_guide_says(tmp_path: Path, postgres: Postgres) -> None:
    """Each `$ lab ...` in docs/WORKSHOP.md exits with the code and prints the output written under it."""
    for name in ("tests", "fixes"):
        (tmp_path / name).symlink_to(ROOT / name)
    text = DOC.read_text()
    blocks = BLOCK.findall(text)
    assert blocks, "the guide has no console blocks"
    update = os.environ.get("LAB_UPDATE_DOC") == "1"
    problems: list[str] = []
    for block in blocks:
        written = block
        for command in parse(block):
            code, output = run(command, tmp_path, postgres.dsn)
            if command.exit_code is not None and code != command.exit_code:
                problems.append(f"`{command.line}` exited {code}, the guide says {command.exit_code}:\n{output}")
            if update:
                shown = POSTGRES_LINE.sub("postgres: ...", output)
                old = "\n".join([f"$ {command.line}", *command.expected]) + "\n"
                written = written.replace(old, f"$ {command.line}\n{shown}", 1)
            elif not pattern(command.expected).fullmatch(output):
                problems.append(f"`{command.line}` printed:\n{output}\nbut the guide says:\n"
                                + "\n".join(command.expected))
        if update:
            text = text.replace(block, written, 1)
    if update:
        DOC.write_text(text)
    assert not problems, "\n\n".join(problems)
    # What the guide says the commands leave behind: the exercise copies, and nothing else.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixes", "tests", "workshop"]


def test_the_parser_reads_commands_outputs_and_exit_codes() -> None:
    """A block's commands, their expected lines and their `echo $?` codes are read as written."""
    commands = parse("$ lab check 1\nFAIL\n...\n$ echo $?\n1\n$ lab exercise 1\n")
    assert [(c.line, c.expected, c.exit_code) for c in commands] == [
        ("lab check 1", ["FAIL", "..."], 1),
        ("lab exercise 1", [], None),
    ]


def test_ellipses_match_any_lines_and_any_text() -> None:
    """'...' alone matches any lines (none included); inside a line it matches any text."""
    assert pattern(["a", "...", "d ... f"]).fullmatch("a\nb\nc\nd e f\n")
    assert pattern(["a", "...", "d"]).fullmatch("a\nd\n")
    assert not pattern(["a", "d"]).fullmatch("a\nb\nd\n")
