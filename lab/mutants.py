"""``make mutants``: how good is the grader? Break the lab's own fixes on purpose, and count what it catches.

Every fix in ``fixes/`` is mutated two ways, one mutant at a time:

* by cosmic-ray's operators (numbers +/- 1, comparison and boolean operators swapped, ``not`` added or
  removed, exception handlers replaced, loops that never run ...), on the code the grader runs: the
  handler and the constants it reads. Declarations the grader takes from ``scenarios/`` instead
  (``CANONICAL``, ``INVARIANT``, ``CRASH``, scenario 2's attack figures) are never read from the file
  under test, so they are not mutated;
* at the SQL level, with PostgreSQL's own parser (pglast, libpg_query): each WHERE conjunct dropped
  (and each disjunct, at every level of AND and OR), ``ON CONFLICT DO NOTHING`` turned into a plain
  INSERT or into ``DO UPDATE`` (and ``DO UPDATE`` into the other two), ``RETURNING`` dropped,
  ``FOR UPDATE`` dropped, and every ``transaction()`` run at each other isolation level. The
  mutated statement is printed back by pglast; a control mutant with every statement printed back
  unchanged must pass, so a kill is the mutation's, never the printer's.

The test command is ``lab check N FILE``, the very command a learner runs, against one PostgreSQL
started here and named to each check through ``LAB_DATABASE_URL`` (two checks at a time, one per core).
Exit 1 or 2 kills the mutant; exit 0 lets it survive. A surviving mutant must be listed, with the
reason it is still a correct handler, in ``tests/equivalent_mutants.toml``; a listed one that is
killed is a grader that rejects a correct handler, or a list gone stale. Either way the run fails.

Why cosmic-ray rather than mutmut: mutmut 3 runs pytest only, in-process, through trampolines
compiled into a copy of the package, which the grader's loading of a file by path would bypass;
cosmic-ray's operators and ``mutate_code`` are a library, so each mutant is written to its own file
and graded exactly as a learner's file is, and ``fixes/`` is never touched in place.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from lab.registry import SCENARIOS, ScenarioInfo

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tests" / "equivalent_mutants.toml"
RESULTS = ROOT / "mutants" / "results.json"
QUERY_METHODS = {"fetch", "fetchrow", "fetchval", "execute", "executemany"}
ISOLATION_LEVELS = ("read_committed", "repeatable_read", "serializable")
#: Declarations a grader reads from ``scenarios/``, never from the file it grades.
NOT_GRADED = {
    "CANONICAL", "INVARIANT", "CRASH", "SEED", "CLIENTS", "OUTAGE_S", "BUCKET_S", "PERMANENT_STATUSES",
    "CLIENT_TIMEOUT_S", "MAX_PEAK_SHARE", "MAX_CALLS_ON_PERMANENT", "MAX_CHARGES_PER_CLIENT",
}  # fmt: skip
#: cosmic-ray's ExceptionReplacer names an exception nothing raises; the mutant file defines it.
STAND_IN = "\n\nclass CosmicRayTestingException(Exception):  # cosmic-ray's stand-in: nothing raises it\n    pass\n"
CHECK_TIMEOUT_S = 300  # a check that outlives this is a lab bug, reported as such


@dataclass(frozen=True)
class Mutant:
    """One changed copy of a fix: ``ident`` names it in the equivalent list, stable across line moves."""

    number: int
    ident: str
    line: int
    source: str


@dataclass
class Outcome:
    number: int
    ident: str
    line: int
    status: str  # killed | survived | cannot-grade | timeout | error
    attack: str  # the attack that killed it, or the one line of a check that could not grade
    seconds: float
    output: str = field(repr=False, default="")
    rules: list[str] = field(default_factory=list)  # the rules the verdict said were broken


# -- python mutants, by cosmic-ray -------------------------------------------------------------------------


def graded_lines(source: str) -> set[int]:
    """Lines of the code the grader runs: functions, and module constants that a function reads."""
    tree = ast.parse(source)
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    read = {n.id for f in functions for n in ast.walk(f) if isinstance(n, ast.Name)}
    lines: set[int] = set()
    for node in tree.body:
        names = {t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)}
        if node in functions or (names and names & read and not names & NOT_GRADED):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def type_hints(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the type hints are: mutating one changes no behaviour (or breaks the import), so none is mutated."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        hint = getattr(node, "annotation", None) if isinstance(node, ast.arg | ast.AnnAssign) else None
        hint = node.returns if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else hint
        if hint is not None and hint.end_lineno is not None and hint.end_col_offset is not None:
            spans.append(((hint.lineno, hint.col_offset), (hint.end_lineno, hint.end_col_offset)))
    return spans


def python_mutants(number: int, source: str) -> Iterator[Mutant]:
    from cosmic_ray.ast import ast_nodes, get_ast
    from cosmic_ray.commands.init import _operators
    from cosmic_ray.mutating import mutate_code

    graded, hints = graded_lines(source), type_hints(source)
    for name, _args, operator in _operators({}):
        tree = get_ast(source)
        positions = [(start, end) for node in ast_nodes(tree) for start, end in operator.mutation_positions(node)]
        for occurrence, (start, end) in enumerate(positions):
            if start[0] not in graded or any(a <= start and end <= b for a, b in hints):
                continue
            try:
                mutated = mutate_code(source, operator, occurrence)
            except AttributeError:  # cosmic-ray 8.7's ExceptionReplacer trips on a dotted name (lab.ProviderError)
                if name != "core/ExceptionReplacer":
                    raise
                mutated = _replace(source, (*start, *end), "CosmicRayTestingException")
            if mutated is None or mutated == source:
                continue
            yield Mutant(number, f"{name}: {_changed(source, mutated)}", start[0], mutated + STAND_IN)


def _changed(before: str, after: str) -> str:
    diff = list(difflib.unified_diff(before.splitlines(), after.splitlines(), n=0, lineterm=""))[2:]
    removed = " / ".join(" ".join(d[1:].split()) for d in diff if d.startswith("-"))
    added = " / ".join(" ".join(d[1:].split()) for d in diff if d.startswith("+"))
    return f"{removed} -> {added}"


# -- SQL mutants, by PostgreSQL's parser -------------------------------------------------------------------


@dataclass(frozen=True)
class _Statement:
    sql: str
    line: int
    span: tuple[int, int, int, int]  # the string literal: lineno, col_offset, end_lineno, end_col_offset


def _statements(source: str) -> Iterator[_Statement]:
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in QUERY_METHODS
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            arg = node.args[0]
            assert arg.end_lineno is not None and arg.end_col_offset is not None
            span = (arg.lineno, arg.col_offset, arg.end_lineno, arg.end_col_offset)
            yield _Statement(str(arg.value), arg.lineno, span)


def _replace(source: str, span: tuple[int, int, int, int], text: str) -> str:
    lines = source.splitlines(keepends=True)
    start_line, start_col, end_line, end_col = span
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    data = source.encode()
    start = offsets[start_line - 1] + start_col
    end = offsets[end_line - 1] + end_col
    return (data[:start] + text.encode() + data[end:]).decode()


Edit = Callable[[Any], None]  # changes a freshly parsed statement in place


def sql_edits(stmt: Any) -> list[tuple[str, Edit]]:
    """The mutations one parsed statement allows, each as (description, edit to apply to a fresh copy)."""
    from pglast.enums import OnConflictAction

    edits: list[tuple[str, Edit]] = []
    for label, path in _where_clauses(stmt):
        root = _get(stmt, path)
        listed = list(_branches(root))
        if not listed:
            edits.append((f"{label}: drop `{_sql(root)}`", _drop_where(path)))
        for index, (owner, arg) in enumerate(listed):
            kind = "conjunct" if _is_and(owner) else "disjunct"
            edits.append((f"{label}: drop {kind} `{_sql(owner.args[arg])}`", _drop_branch(path, index)))
    conflict = getattr(stmt, "onConflictClause", None)
    if conflict is not None:
        edits.append((f"ON CONFLICT {_action(conflict)} -> plain INSERT", _set(("onConflictClause",), None)))
        if conflict.action == OnConflictAction.ONCONFLICT_NOTHING:
            elems = conflict.infer.indexElems if conflict.infer is not None else None
            if elems:
                column = elems[0].name
                edits.append((f"ON CONFLICT DO NOTHING -> DO UPDATE SET {column} = EXCLUDED.{column}",
                              _do_update(column)))
        else:
            edits.append(("ON CONFLICT DO UPDATE -> DO NOTHING", _do_nothing))
    for returning in ("returningClause", "returningList"):  # PostgreSQL 18's parser, and older ones
        if getattr(stmt, returning, None):
            edits.append(("drop RETURNING", _set((returning,), None)))
    if getattr(stmt, "lockingClause", None):
        edits.append(("drop FOR UPDATE", _set(("lockingClause",), None)))
    return edits


def _where_clauses(stmt: Any) -> list[tuple[str, tuple[str, ...]]]:
    found: list[tuple[str, tuple[str, ...]]] = []
    if getattr(stmt, "whereClause", None) is not None:
        found.append(("WHERE", ("whereClause",)))
    conflict = getattr(stmt, "onConflictClause", None)
    if conflict is not None and conflict.whereClause is not None:
        found.append(("ON CONFLICT ... WHERE", ("onConflictClause", "whereClause")))
    return found


def _get(node: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        node = getattr(node, name)
    return node


def _set(path: tuple[str, ...], value: Any) -> Edit:
    def edit(stmt: Any) -> None:
        setattr(_get(stmt, path[:-1]), path[-1], value)

    return edit


def _is_and(node: Any) -> bool:
    from pglast.enums import BoolExprType

    return bool(node.boolop == BoolExprType.AND_EXPR)


def _branches(node: Any) -> Iterator[tuple[Any, int]]:
    """Every (AND or OR, argument index) in a condition, outermost first: what dropping one can remove."""
    from pglast import ast as pg
    from pglast.enums import BoolExprType

    if isinstance(node, pg.BoolExpr):
        if node.boolop in (BoolExprType.AND_EXPR, BoolExprType.OR_EXPR):
            for i in range(len(node.args or ())):
                yield node, i
        for arg in node.args or ():
            yield from _branches(arg)


def _neutral(condition: Any, value: bool) -> Any:
    """``condition`` made always true (a dropped conjunct) or always false (a dropped disjunct).

    Removing it outright can leave a ``$n`` that no other part of the statement mentions, and PostgreSQL
    then refuses the statement ("could not determine data type of parameter"): the mutant would die of
    that, not of the missing condition. Kept inside ``IS [NOT] NULL``, its parameters keep their types.
    """
    from pglast import parse_sql

    text = f"({_sql(condition)}) IS NOT NULL OR true" if value else f"({_sql(condition)}) IS NULL AND false"
    select: Any = parse_sql(f"SELECT 1 WHERE {text}")[0].stmt
    return select.whereClause


def _drop_where(path: tuple[str, ...]) -> Edit:
    def edit(stmt: Any) -> None:
        _set(path, _neutral(_get(stmt, path), True))(stmt)

    return edit


def _drop_branch(path: tuple[str, ...], index: int) -> Edit:
    def edit(stmt: Any) -> None:
        owner, arg = list(_branches(_get(stmt, path)))[index]
        owner.args = tuple(_neutral(a, _is_and(owner)) if i == arg else a for i, a in enumerate(owner.args))

    return edit


def _action(conflict: Any) -> str:
    from pglast.enums import OnConflictAction

    return "DO NOTHING" if conflict.action == OnConflictAction.ONCONFLICT_NOTHING else "DO UPDATE"


def _do_update(column: str) -> Edit:
    """The loser gets a row back too: the wrong fix that wants RETURNING to "always work"."""

    def edit(stmt: Any) -> None:
        from pglast import ast as pg
        from pglast.enums import OnConflictAction

        stmt.onConflictClause.action = OnConflictAction.ONCONFLICT_UPDATE
        excluded = pg.ColumnRef(fields=(pg.String(sval="excluded"), pg.String(sval=column)))
        stmt.onConflictClause.targetList = (pg.ResTarget(name=column, val=excluded),)

    return edit


def _do_nothing(stmt: Any) -> None:
    from pglast.enums import OnConflictAction

    stmt.onConflictClause.action = OnConflictAction.ONCONFLICT_NOTHING
    stmt.onConflictClause.targetList = None
    stmt.onConflictClause.whereClause = None


def _sql(node: Any) -> str:
    from pglast.stream import RawStream

    return str(RawStream()(node))


def _printed(stmt: Any) -> str:
    from pglast.stream import RawStream

    return str(RawStream()(stmt))


def sql_mutants(number: int, source: str) -> Iterator[Mutant]:
    from pglast import parse_sql

    for statement in _statements(source):
        try:
            parsed = parse_sql(statement.sql)
        except Exception:  # not SQL the parser knows (a fix may build statements): nothing to mutate
            continue
        if len(parsed) != 1:
            continue
        short = " ".join(statement.sql.split())[:60]
        for description, edit in sql_edits(parsed[0].stmt):
            fresh = copy.deepcopy(parsed[0].stmt)
            edit(fresh)
            text = _printed(fresh)
            yield Mutant(number, f"sql {short}...: {description}", statement.line,
                         _replace(source, statement.span, repr(text)))
    yield from isolation_mutants(number, source)


def isolation_mutants(number: int, source: str) -> Iterator[Mutant]:
    """Every ``.transaction(...)`` run at each isolation level other than its own."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or getattr(node.func, "attr", None) != "transaction":
            continue
        current = next((k for k in node.keywords if k.arg == "isolation"), None)
        level = str(current.value.value) if current and isinstance(current.value, ast.Constant) else "read_committed"
        assert node.end_lineno is not None and node.end_col_offset is not None
        call = ast.get_source_segment(source, node) or ""
        for other in ISOLATION_LEVELS:
            if other == level:
                continue
            keywords = [k for k in node.keywords if k.arg != "isolation"]
            changed = ast.Call(node.func, node.args, [*keywords, ast.keyword("isolation", ast.Constant(other))])
            text = ast.unparse(changed)
            span = (node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)
            yield Mutant(number, f"isolation: {call} at {level} -> {other}", node.lineno, _replace(source, span, text))


def reprinted(source: str) -> str:
    """The control: every statement printed back by pglast, nothing changed. It must pass."""
    from pglast import parse_sql

    for statement in sorted(_statements(source), key=lambda s: s.span, reverse=True):
        try:
            parsed = parse_sql(statement.sql)
        except Exception:
            continue
        if len(parsed) == 1:
            source = _replace(source, statement.span, repr(_printed(parsed[0].stmt)))
    return source


def mutants_of(info: ScenarioInfo) -> list[Mutant]:
    source = Path(str(info.module("fixed").__file__)).read_text()
    found = [Mutant(info.number, "control: every statement printed back by pglast, unchanged", 0, reprinted(source))]
    seen: dict[str, int] = {}
    for mutant in [*python_mutants(info.number, source), *sql_mutants(info.number, source)]:
        seen[mutant.ident] = seen.get(mutant.ident, 0) + 1
        ident = mutant.ident if seen[mutant.ident] == 1 else f"{mutant.ident} (#{seen[mutant.ident]})"
        found.append(Mutant(mutant.number, ident, mutant.line, mutant.source))
    return found


# -- running `lab check` on each ---------------------------------------------------------------------------


def check(mutant: Mutant, info: ScenarioInfo, dsn: str, folder: Path) -> Outcome:
    path = folder / f"m{abs(hash(mutant.ident)):x}" / f"{info.slug}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(mutant.source)
    env = {**os.environ, "LAB_DATABASE_URL": dsn, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "lab.cli", "check", str(info.number), str(path)],
                              capture_output=True, text=True, env=env, cwd=path.parent, timeout=CHECK_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return Outcome(mutant.number, mutant.ident, mutant.line, "timeout", f"no verdict in {CHECK_TIMEOUT_S} s",
                       time.monotonic() - started)
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    said = " ".join(done.stdout.split())  # rich wraps long lines: read the words, not the lines
    if done.returncode == 1 and (failed := re.search(r"FAIL: (.*?): \d+ of \d+ \w+ broke a rule", said)):
        rules = list(dict.fromkeys(re.findall(r"Rule broken: ([^.]+)\.", said)))
        return Outcome(mutant.number, mutant.ident, mutant.line, "killed", failed.group(1), seconds, output, rules)
    if done.returncode == 2:
        return Outcome(mutant.number, mutant.ident, mutant.line, "cannot-grade", done.stderr.strip()[:200], seconds,
                       output)
    if done.returncode == 0:
        return Outcome(mutant.number, mutant.ident, mutant.line, "survived", "", seconds, output)
    return Outcome(mutant.number, mutant.ident, mutant.line, "error", f"exit {done.returncode}", seconds, output)


#: The grader's own suites, graded the same way on the CLI's full budget: (folder, the outcome they must have).
SUITES = {"right": (ROOT / "tests" / "right_fixes", "survived"), "wrong": (ROOT / "tests" / "wrong_fixes", "killed")}


def suite_of(info: ScenarioInfo) -> list[Mutant]:
    """The scenario's right and wrong fixes from the test suites, each named ``right: <file>`` or ``wrong: <file>``."""
    return [Mutant(info.number, f"{kind}: {path.stem}", 0, path.read_text())
            for kind, (folder, _) in SUITES.items() for path in sorted(folder.glob(f"s{info.number}_*.py"))]


def load_equivalent(path: Path = EQUIVALENT) -> dict[int, dict[str, str]]:
    """``{scenario: {mutant: why it is still a correct handler}}`` from the committed list."""
    if not path.exists():
        return {}
    listed: dict[int, dict[str, str]] = {}
    for slug, entries in tomllib.loads(path.read_text()).items():
        number = next(i.number for i in SCENARIOS.values() if i.slug == slug)
        for entry in entries:
            for ident in entry["mutants"]:
                listed.setdefault(number, {})[ident] = entry["why"]
    return listed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.mutants", description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", type=int, default=sorted(SCENARIOS), help="scenario numbers")
    parser.add_argument("--jobs", type=int, default=2, help="checks at a time (default 2, one per core)")
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    parser.add_argument("--match", default="", help="only mutants whose name contains this text")
    parser.add_argument("--no-suites", action="store_true", help="skip tests/right_fixes and tests/wrong_fixes")
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    infos = [SCENARIOS[n] for n in args.scenarios]
    todo = [(m, info) for info in infos for m in mutants_of(info) if args.match in m.ident]
    if not args.no_suites:
        todo += [(m, info) for info in infos for m in suite_of(info) if args.match in m.ident]
    if args.list:
        for mutant, info in todo:
            console.print(f"{info.slug}:{mutant.line}  {mutant.ident}", markup=False, soft_wrap=True)
        return 0
    from lab.postgres.provision import provision

    equivalent = load_equivalent()
    started = time.monotonic()
    outcomes: list[Outcome] = []
    with provision() as pg, tempfile.TemporaryDirectory(prefix="lab-mutants-") as folder:
        console.print(pg.description, style="dim")
        with Progress(console=console, transient=True) as progress, \
                concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            task = progress.add_task(f"lab check on {len(todo)} mutants", total=len(todo))
            futures = [pool.submit(check, m, info, pg.dsn, Path(folder)) for m, info in todo]
            for future in concurrent.futures.as_completed(futures):
                outcomes.append(future.result())
                progress.advance(task)
    elapsed = time.monotonic() - started
    order = {(m.number, m.ident): i for i, (m, _) in enumerate(todo)}
    outcomes.sort(key=lambda o: order[(o.number, o.ident)])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    code = report(console, infos, [o for o in outcomes if not _is_suite(o)], equivalent, elapsed,
                  complete=not args.match)
    suites = [o for o in outcomes if _is_suite(o)]
    return max(code, report_suites(console, infos, suites)) if suites else code


def _is_suite(outcome: Outcome) -> bool:
    return outcome.ident.split(": ", 1)[0] in SUITES


def report_suites(console: Console, infos: list[ScenarioInfo], outcomes: list[Outcome]) -> int:
    """Every wrong fix rejected and every right one accepted, on the full budget; each verdict and its rules."""
    table = Table(title="tests/wrong_fixes and tests/right_fixes, each graded by `lab check`")
    for column in ("scenario", "wrong fixes rejected", "right fixes accepted", "checks"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    problems = []
    for info in infos:
        mine = [o for o in outcomes if o.number == info.number]
        wrong = [o for o in mine if o.ident.startswith("wrong:")]
        right = [o for o in mine if o.ident.startswith("right:")]
        rejected = [o for o in wrong if o.status == "killed"]
        accepted = [o for o in right if o.status == "survived"]
        problems += [f"{info.slug}: {o.ident} was {o.status} ({o.attack or 'every attack held'})"
                     for o in mine if o.status != SUITES[o.ident.split(": ", 1)[0]][1]]
        table.add_row(f"{info.number} {info.title.lower()}", f"{len(rejected)} of {len(wrong)}",
                      f"{len(accepted)} of {len(right)}", f"{sum(o.seconds for o in mine):.0f} s")
    console.print(table)
    for o in outcomes:
        verdict = f"exit 1 at `{o.attack}`; rule broken: {'; '.join(o.rules) or '(none named)'}" \
            if o.status == "killed" else ("exit 0" if o.status == "survived" else f"{o.status}: {o.attack}")
        console.print(f"  {o.ident} -> {verdict}", markup=False, soft_wrap=True)
    for problem in problems:
        console.print(f"✗ {problem}", markup=False, soft_wrap=True)
    return 1 if problems else 0


def report(console: Console, infos: list[ScenarioInfo], outcomes: list[Outcome],
           equivalent: dict[int, dict[str, str]], elapsed: float, *, complete: bool) -> int:
    table = Table(title=f"mutants of fixes/*.py, each graded by `lab check` ({elapsed:.0f} s in all)")
    for column in ("scenario", "mutants", "killed", "equivalent", "survived", "kill rate", "checks"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    problems: list[str] = []
    for info in infos:
        mine = [o for o in outcomes if o.number == info.number]
        listed = equivalent.get(info.number, {})
        control = [o for o in mine if o.ident.startswith("control:")]
        mutants = [o for o in mine if not o.ident.startswith("control:")]
        killed = [o for o in mutants if o.status in ("killed", "cannot-grade")]
        survived = [o for o in mutants if o.status == "survived"]
        equal = [o for o in survived if o.ident in listed]
        live = [o for o in survived if o.ident not in listed]
        for o in control:
            if o.status != "survived":
                problems.append(f"{info.slug}: the control (statements printed back by pglast) was {o.status}: "
                                f"{o.attack}")
        for o in mutants:
            if o.status in ("timeout", "error"):
                problems.append(f"{info.slug}:{o.line}: {o.ident}: {o.status} ({o.attack})")
            elif o.status != "survived" and o.ident in listed:
                problems.append(f"{info.slug}:{o.line}: listed as equivalent but {o.status} by `{o.attack}`: "
                                f"{o.ident}")
        problems += [f"{info.slug}:{o.line}: survived: {o.ident}" for o in live]
        if complete:
            ran = {o.ident for o in mutants}
            problems += [f"{info.slug}: listed as equivalent but no longer generated: {i}" for i in listed
                         if i not in ran]
        deciding = len(mutants) - len(equal)
        rate = f"{len(killed) / deciding:.0%}" if deciding else "-"
        exit_2 = sum(o.status == "cannot-grade" for o in killed)
        table.add_row(f"{info.number} {info.title.lower()}", str(len(mutants)), f"{len(killed)} ({exit_2})",
                      str(len(equal)), str(len(live)), rate, f"{sum(o.seconds for o in mine):.0f} s")
    console.print(table)
    console.print("killed: `lab check` exited 1, an attack broke a rule, or (in brackets) 2, the file could not be"
                  " graded. kill rate: killed / (mutants - equivalent). checks: the time the checks took, two at a"
                  f" time. Equivalent mutants, each with why it is still a correct handler: "
                  f"{EQUIVALENT.relative_to(ROOT)}; every outcome: {RESULTS.relative_to(ROOT)}.")
    for problem in problems:
        console.print(f"✗ {problem}", markup=False, soft_wrap=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
