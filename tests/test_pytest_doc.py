"""docs/PYTEST.md cannot rot: every ```console command in it is run in a copy of the example app, and compared.

Commands are ``$ pytest ...`` (run with this venv's pytest, on a 100-column terminal, against this
session's server) and ``$ echo $?``; their expected output follows the conventions of
tests/test_workshop_doc.py (a line ``...`` is any lines, ``...`` in a line any text). The doc's
```sh install block is run by tests/test_install.py, in a fresh venv. ``LAB_UPDATE_DOC=1`` rewrites
the outputs from a real run (the server's line and timings stay elided); read the diff before committing.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from test_workshop_doc import BLOCK, normalise, parse, pattern

from lab.postgres.provision import Postgres

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "PYTEST.md"
EXAMPLE = ROOT / "examples" / "orders"
ELIDED = [  # what differs between runs and machines, as the doc writes it
    (re.compile(r"^platform .*\n(?:.*\n)*?asyncio: .*$", re.M), "..."),
    (re.compile(r"^postgres: .*$", re.M), "postgres: ..."),
    (re.compile(r"\(\d+\.\d\d s\)$", re.M), "(... s)"),
    (re.compile(r"^=+ (.*) in \d+\.\d+s( \([0-9:]+\))? =+$", re.M), r"... \1 in ...s ..."),  # centred: widths vary
    (re.compile(r" in \d+\.\d+s( \([0-9:]+\))?$", re.M), " in ...s"),
    (re.compile(r"^(    stress: .*?: )\d+ of (\d+ trials broke)", re.M), r"\1... of \2"),  # a measured rate
]


def first_difference(expected: list[str], output: str) -> str:
    """Where the output leaves the guide: a long output's mismatch is otherwise a needle in two haystacks."""
    matched = 0
    for count in range(1, len(expected) + 1):
        found = pattern(expected[:count]).match(output)
        if found is None:
            there = output[matched:].splitlines()[:3]
            return f"the guide's line {count} {expected[count - 1]!r} is not what it printed there: {there!r}"
        matched = found.end()
    return f"it printed more than the guide says: {output[matched:].splitlines()[:3]!r}"


def test_every_command_in_the_pytest_guide_prints_what_the_guide_says(tmp_path: Path, postgres: Postgres) -> None:
    """Each `$ pytest ...` in docs/PYTEST.md, run in the example app, exits and prints as the guide says."""
    app = tmp_path / "orders"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("frontrun", "__pycache__"))
    # The guide shows a person's terminal: with CI or BUILD_NUMBER set (as on a CI runner), pytest prints
    # each failure's whole message in its short summary instead of one cut line.
    outside_ci = {name: value for name, value in os.environ.items() if name not in ("CI", "BUILD_NUMBER")}
    env = {**outside_ci, "LAB_DATABASE_URL": postgres.dsn, "COLUMNS": "100"}
    text = DOC.read_text()
    update = os.environ.get("LAB_UPDATE_DOC") == "1"
    problems = []
    blocks = BLOCK.findall(text)
    assert blocks, "the guide has no console blocks"
    for block in blocks:
        written = block
        for command in parse(block, program="pytest"):
            line, expected, exit_code = command.line, command.expected, command.exit_code
            argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *shlex.split(line)[1:]]
            done = subprocess.run(argv, cwd=app, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=300, check=False)
            output = normalise(done.stdout)
            if exit_code is not None and done.returncode != exit_code:
                problems.append(f"`{line}` exited {done.returncode}, the guide says {exit_code}:\n{output}")
            if update:
                shown = output
                for elided, instead in ELIDED:
                    shown = elided.sub(instead, shown)
                written = written.replace("\n".join([f"$ {line}", *expected]) + "\n", f"$ {line}\n{shown}", 1)
            elif not pattern(expected).fullmatch(output):
                problems.append(f"`{line}`: {first_difference(expected, output)}\nIt printed:\n{output}\n"
                                "but the guide says:\n" + "\n".join(expected))
        text = text.replace(block, written, 1)
    if update:
        DOC.write_text(text)
    assert not problems, "\n\n".join(problems)
