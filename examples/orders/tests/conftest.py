"""The order service's test set-up: its two versions, its migrations, and a fake payment provider."""

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

APP = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["buggy", "fixed"])
def orders(request: pytest.FixtureRequest) -> ModuleType:
    """The service as it shipped (buggy/) and after the fix (fixed/): every test runs against both."""
    spec = importlib.util.spec_from_file_location(f"orders_{request.param}", APP / request.param / "orders.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def lab_schema(orders: ModuleType) -> Any:
    """What every test's fresh schema gets: the app's own migrations, run on the lab's connection."""
    return orders.migrate


class FakePayments:
    """The payment provider's API as tests see it: like Stripe, a repeated idempotency key charges once."""

    def __init__(self) -> None:
        self.charges: dict[str, str] = {}

    async def charge(self, customer: str, amount_cents: int, idempotency_key: str | None = None) -> str:
        if idempotency_key in self.charges:
            return self.charges[idempotency_key]
        charge_id = f"ch_{len(self.charges) + 1}"
        self.charges[idempotency_key or charge_id] = charge_id
        return charge_id


@pytest.fixture
def payments(lab: Any) -> Any:
    """The fake, wrapped by the lab: each charge is a step of the schedule, recorded for the invariant."""
    return lab.fake(FakePayments)
