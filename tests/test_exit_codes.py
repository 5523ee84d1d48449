"""The README's exit-code table is true: every cell it fills is produced by a command run here.

Code 130 (interrupted) is held for every command by ``test_cli.py``'s signal test and ``make soak``;
this module checks that the table claims it for exactly the commands those signal.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soak

from lab.postgres.provision import Postgres

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
WORKSHOP = ROOT / "docs" / "WORKSHOP.md"
LAB = [sys.executable, "-m", "lab.cli"]
MAKE = ["make", "--no-print-directory"]  # under `make test` a nested make would name its directory

# Cells too slow to produce here, and the test that produces them.
HELD_ELSEWHERE = {
    ("lab matrix", 1): ("test_matrix.py", "test_a_cell_unlike_its_claim_is_reported_and_exits_1"),
    # No flag makes a scenario lie any more (--concurrency 1 is refused), so it takes a broken scenario.
    ("lab run N", 1): ("test_flags.py", "test_a_run_whose_side_does_not_behave_exits_1"),
}

# (command as the table names it, exit code): a cheap command that exits with it, and what its output must say.
EXAMPLES: dict[tuple[str, int], tuple[list[str], str]] = {
    ("lab list", 0): ([*LAB, "list"], "s1_dedup_race"),
    ("lab list", 2): ([*LAB, "list", "--turbo"], "--turbo"),
    ("lab run N", 0): ([*LAB, "run", "1", "--fixed", "--stress", "--trials", "2"], "fix held"),
    ("lab run N", 2): ([*LAB, "run", "9"], "unknown scenario '9'"),
    ("lab herd --occ", 0): ([*LAB, "herd", "--occ", "--clients", "2"], "full jitter"),
    ("lab herd --occ", 2): ([*LAB, "herd", "--occ", "--clients", "0"], "--clients"),
    ("lab matrix", 0): ([*LAB, "matrix", "--show", "1/read-committed/fixed"], "0/12"),
    ("lab matrix", 2): ([*LAB, "matrix", "2"], "no isolation matrix"),
    ("lab exercise N", 0): ([*LAB, "exercise", "2"], "wrote workshop/s2_retry_herd.py"),
    ("lab exercise N", 2): ([*LAB, "exercise", "1"], "exists already"),  # the test writes it first
    ("lab check N [FILE]", 0): ([*LAB, "check", "2", str(ROOT / "fixes" / "s2_retry_herd.py")], "PASS"),
    ("lab check N [FILE]", 1): ([*LAB, "check", "2", str(ROOT / "tests" / "wrong_fixes" / "s2_retries_4xx.py")],
                                "FAIL"),
    ("lab check N [FILE]", 2): ([*LAB, "check", "1", "no_such_file.py"], "no such file"),
    ("make check-N", 0): ([*MAKE, "-C", str(ROOT), "check-2", f"FILE={ROOT / 'fixes' / 's2_retry_herd.py'}"], "PASS"),
    ("make check-N", 2): ([*MAKE, "-C", str(ROOT), "check-2",
                           f"FILE={ROOT / 'tests' / 'wrong_fixes' / 's2_retries_4xx.py'}"], "Error 1"),
}  # fmt: skip


def exit_table() -> dict[str, dict[int, str]]:
    """The README's table under its `| command | 0 | 1 | 2 | 130 |` header: each command's cells by code."""
    lines = README.read_text().splitlines()
    start = lines.index("| command | 0 | 1 | 2 | 130 |")
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0].strip("`")] = dict(zip((0, 1, 2, 130), cells[1:], strict=True))
    return table


def test_every_exit_code_the_readme_claims_is_one_a_command_gives(tmp_path: Path, postgres: Postgres) -> None:
    """For each filled cell of the README's table, a command exits with that code and says why; no cell is idle."""
    table = exit_table()
    claimed = {(command, code) for command, cells in table.items() for code, text in cells.items()
               if code != 130 and text != "never"}
    assert claimed == set(EXAMPLES) | set(HELD_ELSEWHERE)
    for module, test in HELD_ELSEWHERE.values():
        assert f"def {test}(" in (ROOT / "tests" / module).read_text()
    (tmp_path / "workshop").mkdir()
    (tmp_path / "workshop" / "s1_dedup_race.py").write_text("# my work\n")
    env = {**os.environ, "LAB_DATABASE_URL": postgres.dsn, "PYTHONPATH": str(ROOT)}

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)

    with ThreadPoolExecutor(3) as pool:
        done = dict(zip(EXAMPLES, pool.map(run, [argv for argv, _ in EXAMPLES.values()]), strict=True))
    wrong = [
        f"{' '.join(argv)}: exit {done[cell].returncode}, wanted {cell[1]} and {said!r}\n{done[cell].stderr[-500:]}"
        for cell, (argv, said) in EXAMPLES.items()
        if done[cell].returncode != cell[1] or said not in done[cell].stdout + done[cell].stderr
    ]
    assert wrong == []


def test_every_command_the_table_says_is_interrupted_is_signalled_by_the_soak() -> None:
    """130 is claimed for exactly the lab commands that make soak (and make test, once each) signal."""
    interrupted = {command for command, cells in exit_table().items() if cells[130] == "interrupted"}
    in_the_table = {"list": "lab list", "run": "lab run N", "herd": "lab herd --occ", "matrix": "lab matrix",
                    "exercise": "lab exercise N", "check": "lab check N [FILE]"}
    assert interrupted - {"make check-N"} == {in_the_table[name.split()[0]] for name in soak.COMMANDS}


def test_the_workshop_guide_says_what_make_does_with_a_fail() -> None:
    """The guide tells whoever reads exit codes that make turns a FAIL into its own 2 (`Error 1`)."""
    guide = " ".join(WORKSHOP.read_text().split())
    assert "any failure of the command it runs is make's exit 2" in guide
    assert "Error 1` after a FAIL, `Error 2` when the file cannot be graded" in guide
