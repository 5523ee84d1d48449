"""Measure the order service's first test under the lab's plugin and under frontrun 0.7.0, side by side.

    python examples/orders/frontrun/compare.py [--runs 3]      (make compare-frontrun)

frontrun is never a dependency of the lab: it is installed into a throwaway venv in a temporary
directory outside the repository, removed at the end. Both tools run against one server, the lab's
own (``provision()``: LAB_DATABASE_URL | container | embedded). For each tool and each version of
the app the one test runs alone, ``--runs`` times, each under a deadline; printed: its outcome, the
test's own time (pytest's ``--durations``; the median), the whole pytest run's wall time, and the
first lines of its failure message. Then the lines of test code each tool needed.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from lab.postgres.provision import provision

HERE = Path(__file__).resolve().parent
APP = HERE.parent
REPO = APP.parent.parent
DEADLINE_S = 60
FRONTRUN = ["frontrun==0.7.0", "asyncpg", "pytest", "pytest-asyncio"]
# The lines each tool's version of the test needed: these top-level definitions and the imports
# (the app, its migrations and the fake payment provider are shared, and not counted).
LAB_CODE = {
    APP / "tests" / "conftest.py": ["APP", "orders", "lab_schema", "payments"],
    APP / "tests" / "test_orders.py": [
        "one_paid_order_per_request", "order", "test_a_retried_order_is_made_and_charged_once",
    ],
}
FRONTRUN_CODE = {
    HERE / "test_orders_frontrun.py": ["APP", "DSN", "ON_SCHEMA", "load", "blocking", "query", "orders",
                                       "schema", "OneConnection", "State", "explore", "test_given_one_connection_each"],
}


def code_lines(files: dict[Path, list[str]]) -> int:
    """Lines of code of the named top-level definitions and of every import: no blank, comment or docstring line."""
    total = 0
    for path, names in files.items():
        source = path.read_text().splitlines()
        tree = ast.parse("\n".join(source))
        for node in tree.body:
            named = getattr(node, "name", None) or next(
                (t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)), None
            )
            if not isinstance(node, ast.Import | ast.ImportFrom) and named not in names:
                continue
            skip = {
                line
                for inner in ast.walk(node)
                if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and ast.get_docstring(inner)
                for line in range(inner.body[0].lineno, inner.body[0].end_lineno + 1)  # type: ignore[operator]
            }
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            for number in range(first, node.end_lineno + 1):  # type: ignore[operator]
                text = source[number - 1].strip()
                if number not in skip and text and not text.startswith("#"):
                    total += 1
    return total


def run(python: Path, cwd: Path, test: str, selector: str, env: dict[str, str]) -> tuple[str, float | None, float, str]:
    """One pytest run of one test: (outcome, the test's own seconds, wall seconds, its failure's first lines)."""
    argv = [str(python), "-m", "pytest", "-p", "no:cacheprovider", test, "-k", selector, "--durations=0", "-vv"]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        return f"still running after {DEADLINE_S} s (killed)", None, time.monotonic() - started, ""
    wall = time.monotonic() - started
    out = done.stdout
    call = re.search(r"([\d.]+)s call ", out)
    outcome = "passed" if done.returncode == 0 else "failed"
    message = ""
    if done.returncode:
        block = out[out.find("= FAILURES =") :]
        block = block[block.find("\n_") + 1 :]
        raised = [line[1:].strip() for line in block.splitlines() if line.startswith("E ")]
        if any(line.startswith("frontrun._certificate.InconclusiveExploration") for line in raised):
            outcome = "inconclusive"
        # pytest's E lines are what was raised (frontrun's message); the lab's report has none: it is the block
        shown = raised or block.split("\n=", 1)[0].splitlines()[1:]
        message = "\n".join(shown[:60])
    return outcome, float(call.group(1)) if call else None, wall, message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="frontrun-compare-") as scratch, provision() as pg:
        venv = Path(scratch) / "venv"
        print(f"{pg.description}\ninstalling {' '.join(FRONTRUN)} into a throwaway venv in {scratch} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *FRONTRUN], check=True)
        env = {**os.environ, "LAB_DATABASE_URL": pg.dsn}
        cases = [
            ("lab", Path(sys.executable), APP, "tests/test_orders.py", "retried_order"),
            ("frontrun, given the pool", venv / "bin" / "python", HERE, "test_orders_frontrun.py", "given_the_pool"),
            ("frontrun, one connection each", venv / "bin" / "python", HERE, "test_orders_frontrun.py",
             "one_connection_each"),
        ]
        print(f"load average before: {os.getloadavg()[0]:.1f}; {args.runs} runs each, median shown\n")
        for name, python, cwd, test, selector in cases:
            for version in ("buggy", "fixed"):
                runs = [run(python, cwd, test, f"{selector} and {version}", env) for _ in range(args.runs)]
                counted = Counter(r[0] for r in runs)
                outcomes = sorted(f"{n}x {outcome}" if len(counted) > 1 else outcome for outcome, n in counted.items())
                calls = [r[1] for r in runs if r[1] is not None]
                took = f"test {statistics.median(calls):.2f} s, " if calls else ""
                wall = statistics.median(r[2] for r in runs)
                print(f"{name:30} {version:6} {', '.join(outcomes):50} {took}pytest {wall:.1f} s")
                if runs[0][3]:
                    print("\n".join(f"    | {line}" for line in runs[0][3].splitlines()), "\n")
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
        print(f"lines of test code: lab {code_lines(LAB_CODE)}, frontrun {code_lines(FRONTRUN_CODE)}")


if __name__ == "__main__":
    main()
