"""Which steps can affect each other: statement footprints, read from the real parser, per row where it can.

Partial-order reduction (:mod:`lab.engine.reduction`) may skip an interleaving only when it differs from
one already run by the order of *independent* steps: steps of different sessions that cannot change
each other's result nor the final state. This module decides that, conservatively.

A step's :class:`Footprint` is a set of :class:`Access`: a resource (a table, the provider's ledger,
advisory locks, or everything), the rows it may touch, given as ``column = value`` pins that every such
row satisfies, and whether it writes (or locks). Two accesses conflict when they share a resource, one
of them writes, and their pins do not rule out a common row (a shared column pinned to two different
values does). Each statement is parsed with PostgreSQL's own parser (pglast), and its ``$n`` parameters
resolved to the values bound in this run, so ``WHERE key = $1`` with ``$1 = 'k1'`` touches key k1 only.

Soundness, step by step (READ COMMITTED, the server's default and the lab's):

* A statement's rows are pinned only by top-level ``AND``-ed ``column = constant|$n`` conditions of a
  single-table statement; a write drops its pins on the columns it SETs (the row then matches other
  pins). Joins, subqueries, ``INSERT ... SELECT`` and unknown relations widen to the whole table, and an
  unknown function, DDL or anything the parser does not place widens to everything.
* An INSERT writes its new row (pinned by every value it gives) and *reads* every row that its unique
  indexes compare it with (pinned by each index's columns, read from the catalog), since whether it
  fails, waits or does nothing depends on them; ``ON CONFLICT DO UPDATE`` also writes that row. A
  table with a sequence default makes INSERTs on it conflict (the numbers go in order); one with
  triggers, foreign keys or rules, whose statements touch rows they do not name, conflicts with everything.
* A write inside a transaction is visible to others only at COMMIT, and its row lock lasts until then:
  the write conflicts with other writes and locks of its rows, not with plain reads (they see the last
  committed version, and wait for nothing); its COMMIT conflicts with every step that touches those
  rows, readers included, and its ROLLBACK (the pool's at release too) with every write or lock of
  them. So a lock wait is always ordered against the step that ends it. A plain read holds nothing.
  SELECT ... FOR UPDATE/SHARE and an INSERT's unique-index check are locks in the same sense.
* Under REPEATABLE READ or SERIALIZABLE a statement's result depends on when its snapshot was taken and
  on predicate locks by page: every step of such a transaction conflicts with everything.
* Session advisory locks are released by asyncpg's reset at release, which runs inside the session's
  last step on that connection: once a connection takes one, all its later steps touch advisory locks.
* A crash terminates the backend (its transaction rolls back) and cancels the task: it conflicts with
  everything. Provider calls conflict with each other: the ledger numbers its charges in call order.

Every rule errs towards "conflict": a missed independence costs runs, a wrong one would hide a bug.
``tests/test_reduction.py`` checks the end result against the full search, outcome for outcome.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import asyncpg
from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType, OnConflictAction, TransactionStmtKind

EVERYTHING = "*"
PROVIDER = "provider ledger"
ADVISORY = "advisory locks"

Pins = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Access:
    """Rows of one resource a step may read or write: those matching every ``(column, value)`` pin."""

    resource: str
    pins: Pins = ()
    write: bool = False
    hidden: bool = False  # a write not yet visible to readers (uncommitted), a lock, a wait on one

    def meets(self, other: Access) -> bool:
        if EVERYTHING in (self.resource, other.resource):
            return True
        if self.resource != other.resource or not (self.write or other.write):
            return False
        if (self.hidden and not other.write) or (other.hidden and not self.write):
            return False  # a plain read sees the last committed version and waits for no lock: it commutes
        mine = dict(self.pins)
        return not any(column in mine and mine[column] != value for column, value in other.pins)

    def rows(self) -> str:
        """How the rows read on a timeline: ``key='k1'``, or nothing for the whole table."""
        return ", ".join(f"{column}={value!r}" for column, value in self.pins)


@dataclass(frozen=True)
class Footprint:
    """What one step may touch, and what it is (``verb``: SELECT, COMMIT, provider.charge...), for the why."""

    verb: str
    accesses: frozenset[Access] = frozenset()

    def conflicts(self, other: Footprint) -> bool:
        return any(a.meets(b) for a in self.accesses for b in other.accesses)

    def conflict(self, other: Footprint) -> tuple[Access, Access] | None:
        """The first pair of accesses that makes the two steps conflict, to name it."""
        for a in sorted(self.accesses, key=_order):
            for b in sorted(other.accesses, key=_order):
                if a.meets(b):
                    return a, b
        return None


def _order(access: Access) -> tuple[bool, bool, int, str]:
    """Name the narrowest pinned rows first: key='k1' rather than every column an INSERT gave."""
    return (access.resource == EVERYTHING, not access.pins, len(access.pins), access.resource)


ANYTHING = Footprint("step", frozenset({Access(EVERYTHING, (), True)}))
NOTHING = Footprint("step")
PROVIDER_CALL = Footprint("provider.charge", frozenset({Access(PROVIDER, (), True)}))
CRASH = Footprint("crash", ANYTHING.accesses)


# -- the schema: what a footprint needs to know about each table --------------------------------------


@dataclass(frozen=True)
class Table:
    uniques: tuple[tuple[str, ...], ...] = ()  # the columns of each plain unique index (a primary key too)
    loose: bool = False  # a unique index on an expression, or partial: which rows it compares is unknown
    numbered: bool = False  # a column defaults to a sequence: inserts take numbers in order
    opaque: bool = False  # triggers, foreign keys or rules: its statements touch rows they do not name


@dataclass(frozen=True)
class Catalog:
    """The tables of the scenario schema; a relation not in it (a view, another schema's) touches everything."""

    schema: str
    tables: dict[str, Table] = field(default_factory=dict)


_CATALOG_SQL = """
SELECT c.relname,
       ARRAY(SELECT array_to_string(ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, o)
                                          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                                          ORDER BY k.o), ',')
             FROM pg_catalog.pg_index i
             WHERE i.indrelid = c.oid AND i.indisunique AND i.indexprs IS NULL AND i.indpred IS NULL) AS uniques,
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisunique
               AND (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL)) AS loose,
       EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_attrdef d
                      ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND (a.attidentity <> '' OR pg_catalog.pg_get_expr(d.adbin, d.adrelid) LIKE '%nextval(%')) AS numbered,
       c.relhasrules
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_constraint f
                  WHERE f.contype = 'f' AND (f.conrelid = c.oid OR f.confrelid = c.oid)) AS opaque
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
"""


async def load_catalog(conn: asyncpg.Connection, schema: str) -> Catalog:
    """Read the schema's tables once per install: the reduction needs their unique indexes."""
    rows = await conn.fetch(_CATALOG_SQL, schema)
    tables = {
        r["relname"]: Table(
            tuple(tuple(u.split(",")) for u in r["uniques"]), r["loose"], r["numbered"], r["opaque"]
        )
        for r in rows
    }
    return Catalog(schema, tables)


# -- statements, parsed once per SQL text ------------------------------------------------------------------

#: Functions that read nothing from the database and change nothing: the rest widen a step to everything.
_PURE = frozenset({
    "now", "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday", "count", "sum", "max",
    "min", "avg", "bool_and", "bool_or", "every", "array_agg", "string_agg", "jsonb_agg", "json_agg", "coalesce",
    "format", "lpad", "rpad", "lower", "upper", "length", "char_length", "substr", "substring", "trim", "btrim",
    "concat", "concat_ws", "replace", "left", "right", "position", "strpos", "md5", "sha256", "hashtext",
    "encode", "decode", "convert_from", "convert_to", "to_char", "to_number", "to_timestamp", "to_date",
    "date_trunc", "date_part", "extract", "make_interval", "age", "abs", "ceil", "floor", "round", "trunc",
    "greatest", "least", "nullif", "jsonb_build_object", "json_build_object", "jsonb_build_array",
    "json_build_array", "to_jsonb", "to_json", "jsonb_set", "jsonb_extract_path", "jsonb_extract_path_text",
    "jsonb_typeof", "jsonb_strip_nulls", "row_to_json", "array_length", "cardinality", "unnest",
    "generate_series", "gen_random_uuid", "random", "pg_sleep", "version", "current_setting", "pg_backend_pid",
    "txid_current", "pg_current_xact_id", "num_nonnulls", "num_nulls", "exists", "sign", "mod", "power",
})

_STRONG = {"repeatable read", "serializable"}

# A parameter or a constant in the statement: ("$", n) or ("=", value).
Value = tuple[str, Any]
PinTemplate = tuple[tuple[str, Value], ...]


@dataclass(frozen=True)
class _Target:
    """One access of a statement, before its parameters are bound."""

    table: str
    pins: PinTemplate
    write: bool
    kind: str = "rows"  # rows | lock (FOR UPDATE) | insert (its row, and what its unique indexes compare) | upsert


@dataclass(frozen=True)
class _Parsed:
    verb: str
    control: str | None = None  # begin | commit | rollback | savepoint | release | rollback_to | strong
    strong: bool = False  # BEGIN ISOLATION LEVEL REPEATABLE READ / SERIALIZABLE, or SET TRANSACTION so
    targets: tuple[_Target, ...] = ()
    everything: bool = False
    advisory: bool = False  # takes an advisory lock
    session_advisory: bool = False  # ... one that outlives the transaction


def _norm(value: Any) -> str | None:
    """One spelling per value, so that 'k1' bound and 'k1' written in the SQL compare equal."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, int | float | decimal.Decimal):
        number = decimal.Decimal(str(value))
        return str(int(number)) if number == number.to_integral_value() else format(number.normalize(), "f")
    return str(value)


def _walk(node: Any) -> Iterator[Any]:
    if isinstance(node, tuple | list):
        for item in node:
            yield from _walk(item)
    elif isinstance(node, ast.Node):
        yield node
        slots: Any = getattr(type(node), "__slots__", ())  # pglast's nodes list their fields there
        for name in slots:
            yield from _walk(getattr(node, name, None))


def _value(node: Any) -> Value | None:
    while isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.ParamRef):
        return ("$", node.number)
    if isinstance(node, ast.A_Const):
        if node.isnull:
            return None
        val = node.val
        for attr in ("sval", "ival", "fval", "boolval", "bsval"):
            if hasattr(val, attr):
                got = getattr(val, attr)
                return ("=", decimal.Decimal(got) if attr == "fval" else got)
    return None


def _column(node: Any, names: set[str]) -> str | None:
    if not isinstance(node, ast.ColumnRef):
        return None
    fields: Any = node.fields
    if not all(isinstance(f, ast.String) for f in fields):
        return None
    if len(fields) == 1:
        return str(fields[0].sval)
    if len(fields) == 2 and fields[0].sval in names:
        return str(fields[1].sval)
    return None


def _pins(where: Any, names: set[str]) -> PinTemplate:
    """The ``column = value`` conditions every row the statement touches satisfies (top-level ANDs only)."""
    if where is None:
        return ()
    found: list[tuple[str, Value]] = []
    stack: list[Any] = [where]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
            stack.extend(node.args or ())
        elif (
            isinstance(node, ast.A_Expr)
            and node.kind == A_Expr_Kind.AEXPR_OP
            and len(node.name or ()) == 1
            and node.name[0].sval == "="  # type: ignore[index]  # checked just above
        ):
            for col_side, val_side in ((node.lexpr, node.rexpr), (node.rexpr, node.lexpr)):
                column, value = _column(col_side, names), _value(val_side)
                if column is not None and value is not None:
                    found.append((column, value))
                    break
    return tuple(found)


def _names(relation: Any) -> set[str]:
    names: set[str] = {relation.relname}
    if relation.alias is not None:
        names.add(relation.alias.aliasname)
    return names


def _set_columns(target_list: Any) -> set[str]:
    return {str(t.name) for t in target_list or () if isinstance(t, ast.ResTarget) and t.name}


def _reads_of(stmt: Any, main: Any) -> list[_Target]:
    """Every relation the statement names but its main one, as whole-table reads (writes in a CTE)."""
    targets = []
    for node in _walk(stmt):
        if isinstance(node, ast.RangeVar) and node is not main:
            targets.append(_Target(_qualified(node), (), False))
        elif isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt) and node is not stmt:
            targets.append(_Target(_qualified(node.relation), (), True))
    return targets


def _qualified(relation: Any) -> str:
    return f"{relation.schemaname}.{relation.relname}" if relation.schemaname else str(relation.relname)


def _functions(stmt: Any) -> tuple[bool, bool, bool]:
    """(something unknown is called, an advisory lock is taken, one held past the transaction)."""
    unknown = advisory = session = False
    for node in _walk(stmt):
        if isinstance(node, ast.FuncCall):
            name = str(node.funcname[-1].sval).lower()  # type: ignore[index]  # a call always has a name
            if name.startswith("pg_advisory") or name.startswith("pg_try_advisory"):
                advisory = True
                session |= "xact" not in name
            elif name not in _PURE:
                unknown = True
    return unknown, advisory, session


def _isolation(options: Any) -> bool:
    for option in options or ():
        if isinstance(option, ast.DefElem) and option.defname == "transaction_isolation":
            value = _value(option.arg)
            if value is not None and str(value[1]).lower() in _STRONG:
                return True
    return False


def _parse_one(stmt: Any) -> _Parsed:
    if isinstance(stmt, ast.TransactionStmt):
        kind = stmt.kind
        controls = {
            TransactionStmtKind.TRANS_STMT_BEGIN: "begin", TransactionStmtKind.TRANS_STMT_START: "begin",
            TransactionStmtKind.TRANS_STMT_COMMIT: "commit", TransactionStmtKind.TRANS_STMT_ROLLBACK: "rollback",
            TransactionStmtKind.TRANS_STMT_SAVEPOINT: "savepoint", TransactionStmtKind.TRANS_STMT_RELEASE: "release",
            TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: "rollback_to",
        }  # fmt: skip
        control = controls.get(kind) if kind is not None else None
        if control is None:
            return _Parsed("transaction", everything=True)  # two-phase commit: not a request's business
        verb = {"begin": "BEGIN", "commit": "COMMIT", "rollback": "ROLLBACK"}.get(control, control.upper())
        return _Parsed(verb, control, strong=_isolation(stmt.options))
    if isinstance(stmt, ast.VariableSetStmt):
        if stmt.name in ("TRANSACTION", "SESSION CHARACTERISTICS") or stmt.name == "default_transaction_isolation":
            strong = _isolation(stmt.args) or any(
                v is not None and str(v[1]).lower() in _STRONG for v in map(_value, stmt.args or ())
            )
            return _Parsed("SET", "strong" if strong else None)
        return _Parsed("SET")
    unknown, advisory, session = _functions(stmt)
    if unknown:
        return _Parsed(type(stmt).__name__.removesuffix("Stmt").upper(), everything=True)
    if isinstance(stmt, ast.SelectStmt):
        froms = stmt.fromClause or ()
        locks = bool(stmt.lockingClause)
        main = froms[0] if len(froms) == 1 and isinstance(froms[0], ast.RangeVar) else None
        targets = _reads_of(stmt, main)
        if main is not None:
            pins = _pins(stmt.whereClause, _names(main))
            targets.insert(0, _Target(_qualified(main), pins, locks, "lock" if locks else "rows"))
        elif locks:
            targets = [_Target(t.table, (), True, "lock") for t in targets]
        return _Parsed("SELECT", targets=tuple(targets), advisory=advisory, session_advisory=session)
    if isinstance(stmt, ast.UpdateStmt | ast.DeleteStmt):
        main = stmt.relation
        extra = stmt.fromClause if isinstance(stmt, ast.UpdateStmt) else stmt.usingClause
        pins = () if extra else _pins(stmt.whereClause, _names(main))
        if isinstance(stmt, ast.UpdateStmt):
            changed = _set_columns(stmt.targetList)
            pins = tuple(p for p in pins if p[0] not in changed)
        targets = [_Target(_qualified(main), pins, True), *_reads_of(stmt, main)]
        verb = "UPDATE" if isinstance(stmt, ast.UpdateStmt) else "DELETE"
        return _Parsed(verb, targets=tuple(targets), advisory=advisory, session_advisory=session)
    if isinstance(stmt, ast.InsertStmt):
        return _insert(stmt, advisory, session)
    if isinstance(stmt, ast.LockStmt):
        return _Parsed("LOCK", targets=tuple(_Target(_qualified(r), (), True) for r in stmt.relations or ()))
    return _Parsed(type(stmt).__name__.removesuffix("Stmt").upper(), everything=True)


def _insert(stmt: Any, advisory: bool, session: bool) -> _Parsed:
    main = stmt.relation
    table = _qualified(main)
    select = stmt.selectStmt
    rows = select.valuesLists if isinstance(select, ast.SelectStmt) else None
    columns: list[str] = [t.name for t in stmt.cols or ()]
    others = _reads_of(stmt, main)
    if rows is None or len(rows) != 1 or not columns or len(rows[0]) != len(columns):
        # INSERT ... SELECT, several rows, DEFAULT VALUES, no column list: which rows, we cannot say
        return _Parsed("INSERT", targets=(_Target(table, (), True), *others), advisory=advisory,
                       session_advisory=session)
    pins = tuple((column, value) for column, node in zip(columns, rows[0], strict=True)
                 if (value := _value(node)) is not None)
    kind = "insert"
    conflict = stmt.onConflictClause
    if conflict is not None and conflict.action == OnConflictAction.ONCONFLICT_UPDATE:
        changed = _set_columns(conflict.targetList)
        kind = "upsert:" + ",".join(sorted(changed))
    return _Parsed("INSERT", targets=(_Target(table, pins, True, kind), *others), advisory=advisory,
                   session_advisory=session)


@lru_cache(maxsize=4096)
def parse(sql: str) -> tuple[_Parsed, ...]:
    """Every statement of ``sql``, as the server's parser reads it; what does not parse touches everything."""
    try:
        statements = parse_sql(sql)
    except Exception:  # pglast's ParseError, or a node it cannot build: the server will say what is wrong
        return (_Parsed("statement", everything=True),)
    return tuple(_parse_one(raw.stmt) for raw in statements)


# -- binding: one statement of one run -----------------------------------------------------------------------


def _bound(pins: PinTemplate, args: Sequence[Any]) -> Pins | None:
    """Pins with their values; None when a pin can match no row at all (``= NULL``)."""
    out: list[tuple[str, str]] = []
    for column, (how, raw) in pins:
        if how == "$":
            if not 0 < raw <= len(args):
                continue  # a parameter asyncpg would refuse: the statement fails, touching nothing more
            raw = args[raw - 1]
        value = _norm(raw)
        if value is None:
            return None
        if isinstance(raw, list | tuple | dict):
            continue
        out.append((column, value))
    return tuple(sorted(set(out)))


def _accesses(target: _Target, args: Sequence[Any], catalog: Catalog) -> list[Access]:
    name = target.table
    if "." in name:
        schema, _, name = name.partition(".")
        if schema != catalog.schema:
            return [Access(EVERYTHING, (), True)]
    table = catalog.tables.get(name)
    if table is None or table.opaque:
        return [Access(EVERYTHING, (), True)]
    pins = _bound(target.pins, args)
    if pins is None:
        pins = ()
    if target.kind in ("rows", "lock"):
        return [Access(name, pins, target.write, target.kind == "lock")]
    given = dict(pins)
    accesses = [Access(name, pins, True)]  # the new row
    # The unique-index checks: they wait on an uncommitted row with the same key, and fail or do nothing
    # on a committed one, but a plain read changes nothing for them: a lock, in the sense above.
    if table.loose:
        accesses.append(Access(name, (), True, True))
    for unique in table.uniques:
        if all(column in given for column in unique):
            accesses.append(Access(name, tuple((c, given[c]) for c in unique), True, True))
        elif not table.numbered:
            accesses.append(Access(name, (), True, True))  # a unique column left to a default we cannot see
    if table.numbered:
        accesses.append(Access(f"{name} (its sequence)", (), True))
    if target.kind.startswith("upsert:"):
        changed = set(target.kind.removeprefix("upsert:").split(","))
        for unique in table.uniques:
            if all(column in given for column in unique):
                kept = tuple((c, given[c]) for c in unique if c not in changed)
                accesses.append(Access(name, kept, True))
        if not table.uniques:
            accesses.append(Access(name, (), True))
    return accesses


class Transactions:
    """One backend's transaction state, so that a COMMIT knows what it publishes and unlocks.

    One per connection a session uses in a run (its state starts as a fresh pool hands it out).
    """

    def __init__(self, catalog: Catalog, *, strong: bool = False) -> None:
        self.catalog = catalog
        self.default_strong = strong
        self.open = False
        self.strong = False
        self.held: set[Access] = set()
        self.advisory = False  # a session advisory lock taken: the reset at release lets it go

    def footprint(self, sql: str, args: Sequence[Any], *, many: bool = False) -> Footprint:
        """The footprint of sending ``sql`` with ``args`` now (``many``: args is a list of parameter sets)."""
        parsed = parse(sql)
        verb = parsed[0].verb if len(parsed) == 1 else "statements"
        accesses: set[Access] = set()
        for one in parsed:
            accesses |= self._one(one, args, many)
        if self.advisory:
            accesses.add(Access(ADVISORY, (), True, True))
        return Footprint(verb, frozenset(accesses))

    def _one(self, one: _Parsed, args: Sequence[Any], many: bool) -> set[Access]:
        if one.control == "begin":
            self.open, self.strong, self.held = True, one.strong or self.default_strong, set()
            return set()
        if one.control in ("commit", "rollback"):
            ended = self.held
            self.open, self.strong, self.held = False, False, set()
            # COMMIT publishes the writes (readers see them now); ROLLBACK only lets their locks go.
            return {Access(a.resource, a.pins, True, one.control == "rollback") for a in ended}
        if one.control == "rollback_to":
            return {Access(a.resource, a.pins, True, True) for a in self.held}
        if one.control in ("savepoint", "release"):
            return set()
        if one.control == "strong":
            self.strong = True
            return {Access(EVERYTHING, (), True)}
        if self.strong or (self.default_strong and not self.open) or one.everything:
            found = {Access(EVERYTHING, (), True)}
        else:
            found = set()
            for target in one.targets:
                if many:
                    target = _Target(target.table, (), target.write, "rows")
                found.update(_accesses(target, () if many else args, self.catalog))
        if one.advisory:
            found.add(Access(ADVISORY, (), True, True))
            self.advisory |= one.session_advisory
        if self.open:
            self.held |= {a for a in found if a.write}
            found = {Access(a.resource, a.pins, a.write, a.write) if a.resource != EVERYTHING else a for a in found}
        return found


# -- naming a conflict, for the why under a timeline ---------------------------------------------------------


def describe(access: Access) -> str:
    """``idempotency_keys key='k1'``, ``the provider ledger``, ``every table``."""
    if access.resource == EVERYTHING:
        return "everything"
    if access.resource == PROVIDER:
        return "the provider's ledger"
    rows = access.rows()
    return f"{access.resource} {rows}" if rows else f"every row of {access.resource}"
