"""A participant's handler file, loaded by path and held to the workshop contract.

Everything that can be wrong with the *file* is found here and said in one line (a ``LabError``):
it does not exist, does not compile, fails to import, lacks the function, or the function is not an
``async def`` taking the contract's arguments. What the handler *does* is the grader's business.

Every request gets a fresh copy of the module, as if each ran on its own server: state kept in a
module global (a dict of keys seen, an ``asyncio.Lock``) is not shared between requests, just as it
would not be between two replicas behind a load balancer, so it cannot hide a race from the grader.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from lab.contracts import Response
from lab.errors import LabError

#: The contract of each workshop function: its signature as the brief writes it, and sample arguments.
CONTRACTS: dict[str, tuple[str, tuple[Any, ...], dict[str, Any]]] = {
    "handle_charge": ("async def handle_charge(db, provider, key, body)", ("db", "provider", "key", b"{}"), {}),
    "handle_event": ("async def handle_event(db, event)", ("db", "event"), {}),
    "call_with_retry": ("async def call_with_retry(fn, max_attempts=6)", ("fn",), {"max_attempts": 6}),
}

_names = itertools.count(1)


@dataclass
class Submission:
    """The loaded file: its path, its first module instance, and a way to make fresh ones."""

    path: Path
    contract: str
    module: ModuleType
    code: CodeType

    @property
    def function(self) -> Callable[..., Any]:
        function: Callable[..., Any] = getattr(self.module, self.contract)
        return function

    def schema(self, default: str) -> str:
        """The file's own ``SCHEMA`` if it defines one (a learner may add a column), else the scenario's."""
        schema = getattr(self.module, "SCHEMA", None)
        return schema if isinstance(schema, str) and schema.strip() else default

    def fresh(self) -> ModuleType:
        """A new instance of the module: its top level run again, sharing no globals with any other."""
        return _instantiate(self.path, self.code)

    def per_request(self) -> Callable[..., Any]:
        """The contract function, but each call runs in a fresh module instance (its own 'server')."""
        contract = self.contract

        async def call(*args: Any, **kwargs: Any) -> Any:
            function = getattr(self.fresh(), contract)
            answer = await function(*args, **kwargs)
            if contract == "handle_charge" and not isinstance(answer, Response):
                raise NotAResponse(answer)
            return answer

        return call

    def where(self, exc: BaseException) -> str:
        """'line N' of the deepest frame of the learner's file in ``exc``'s traceback, or ''."""
        return where_in(exc, self.path)


class NotAResponse(TypeError):
    """A charge handler answered with something else than a ``lab.Response``: to its client, a 500."""

    def __init__(self, answer: object) -> None:
        shown = "None" if answer is None else f"a {type(answer).__name__}"
        super().__init__(
            f"handle_charge returned {shown}, not a lab.Response: every path must end in"
            " `return lab.Response(status, body)`, e.g. lab.Response(201, {\"charge_id\": charge_id})"
        )


def load(path: str | Path, contract: str) -> Submission:
    """Compile and import ``path``, then check ``contract`` against it; one clear line if anything is off."""
    path = Path(path)
    shown = str(path)
    if not path.is_file():
        raise LabError(f"{shown}: no such file (create it with 'lab exercise N', or give the path of your .py file)")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabError(f"{shown}: cannot be read: {exc}") from exc
    try:
        code = compile(source, str(path.resolve()), "exec")
    except SyntaxError as exc:
        raise LabError(f"{shown}, line {exc.lineno}: does not compile: {exc.msg}") from exc
    try:
        module = _instantiate(path, code)
    except Exception as exc:
        line = where_in(exc, path)
        at = f", {line}" if line else ""
        raise LabError(f"{shown}{at}: importing it failed: {type(exc).__name__}: {exc}") from exc
    submission = Submission(path, contract, module, code)
    check_contract(submission)
    return submission


def check_contract(submission: Submission) -> None:
    """The function exists, is ``async def``, and accepts the arguments the lab will pass."""
    shown, name = str(submission.path), submission.contract
    expected, args, kwargs = CONTRACTS[name]
    function = getattr(submission.module, name, None)
    if function is None:
        raise LabError(f"{shown}: defines no {name}; the lab calls `{expected}`")
    if not inspect.iscoroutinefunction(function):
        raise LabError(f"{shown}: {name} must be `{expected}`, an async def (it is a plain function)")
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError as exc:
        raise LabError(f"{shown}: {name}{inspect.signature(function)} cannot be called as `{expected}`: {exc}") from exc


def _instantiate(path: Path, code: CodeType) -> ModuleType:
    name = f"_lab_submission_{next(_names)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise LabError(f"{path}: cannot be imported as Python; is it a .py file?")
    module = importlib.util.module_from_spec(spec)
    # Registered only while its top level runs: dataclasses and typing look the module up by name.
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    finally:
        del sys.modules[name]
    return module


def where_in(exc: BaseException, path: Path) -> str:
    resolved = str(path.resolve())
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == resolved]
    return f"line {lines[-1]}" if lines else ""
