"""The container leg (`make test-docker`): the lab on testcontainers, against a Docker daemon that answers.

Collected only when named (pyproject's norecursedirs keeps `make test` out of tests/container): here a
missing daemon is a failure, never a skip. tests/container/leg.sh finds or starts the daemon, builds
the registry-free image when LAB_POSTGRES_IMAGE does not name one, installs the oldest testcontainers
pyproject admits beside the newest, and runs this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest
from packaging.version import Version

from lab.postgres import container
from lab.postgres.provision import DOCKER_SOCK, docker_daemon_answers, provision, verify
from lab.registry import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent.parent
LAB = [sys.executable, "-m", "lab.cli"]
ENV = {k: v for k, v in os.environ.items() if k != "LAB_DATABASE_URL"}  # the lab's own choice: Docker
DOCKER_HOST = ENV.get("DOCKER_HOST") or f"unix://{DOCKER_SOCK}"


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    assert docker_daemon_answers(docker_host=DOCKER_HOST), f"no Docker daemon answers at {DOCKER_HOST}"
    with contextlib.closing(docker.from_env(environment={"DOCKER_HOST": DOCKER_HOST})) as client:
        yield client


@pytest.fixture(autouse=True)
def nothing_left_behind(client: Any) -> Iterator[None]:
    """Every test starts and ends with no container of any lab on the daemon."""
    assert _labs_containers(client) == [], "a lab container was there before the test"
    yield
    assert _labs_containers(client) == [], "a lab container outlived the test"


def _labs_containers(client: Any, owner: str = "") -> list[str]:
    label = f"{container.OWNER}={owner}" if owner else container.OWNER
    return [c.id for c in client.containers.list(all=True, filters={"label": label})]


def _lab(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAB, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_provision_starts_a_labelled_container_reached_through_loopback_and_removes_it(client: Any) -> None:
    """The lab gets a testcontainers server it reaches on 127.0.0.1, labelled with its process; then none is left."""
    with provision(ENV) as pg:
        assert pg.kind == "docker"
        version = importlib.metadata.version("testcontainers")
        line = f"postgres: testcontainers {version}, {container.image(ENV)}, Docker daemon at {DOCKER_HOST} ("
        assert pg.description.startswith(line), pg.description
        assert urlsplit(pg.dsn).hostname == "127.0.0.1"
        assert asyncio.run(verify(pg, timeout=30))
        [found] = client.containers.list(filters={"label": container.OWNER})
        assert found.labels[container.OWNER] == container._owner(os.getpid())
        bindings = [b for bs in found.attrs["HostConfig"]["PortBindings"].values() for b in bs]
        assert bindings and all(b["HostIp"] == "127.0.0.1" for b in bindings)  # published on loopback alone
    assert _labs_containers(client) == []


@pytest.mark.parametrize("number", sorted(SCENARIOS))
def test_every_scenarios_journey_runs_on_a_container(number: int, client: Any) -> None:
    """`lab run N` on testcontainers behaves as on the embedded server: the bug shows, the fix holds, exit 0."""
    done = _lab("run", str(number))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.startswith("postgres: testcontainers "), done.stdout[:300]


def test_lab_check_grades_a_fix_on_a_container(client: Any) -> None:
    """`lab check 1` passes the lab's own fix, on testcontainers."""
    done = _lab("check", "1", str(ROOT / "fixes" / "s1_dedup_race.py"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.splitlines()[1].startswith("postgres: testcontainers "), done.stdout[:300]  # after "checking"


def test_lab_matrix_finds_what_it_expects_on_a_container(client: Any) -> None:
    """`lab matrix` on testcontainers: every cell as lab/journeys/matrix.toml expects, exit 0."""
    done = _lab("matrix")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.startswith("postgres: testcontainers "), done.stdout[:300]


def test_an_image_that_cannot_be_had_is_one_clear_line(client: Any) -> None:
    """LAB_POSTGRES_IMAGE naming an image the daemon cannot get: exit 2 and one line that names it."""
    missing = "idempotency-lab/no-such-image:0"
    done = _lab("run", "1", env={**ENV, "LAB_POSTGRES_IMAGE": missing})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.startswith(f"lab: testcontainers could not start {missing}: "), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_ryuk_is_turned_off_when_its_image_cannot_be_had(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image of Ryuk that is neither here nor pullable turns Ryuk off, as TESTCONTAINERS_RYUK_DISABLED would."""
    monkeypatch.delenv("TESTCONTAINERS_RYUK_DISABLED", raising=False)
    config = SimpleNamespace(ryuk_disabled=False, ryuk_image="idempotency-lab/no-such-ryuk:0")
    said = container._ryuk(client, DOCKER_HOST, config)
    assert said == "Ryuk off: idempotency-lab/no-such-ryuk:0 cannot be had; the lab removes what it started"
    assert config.ryuk_disabled and os.environ["TESTCONTAINERS_RYUK_DISABLED"] == "true"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_no_container_outlives_a_lab_that_is_stopped(sig: signal.Signals, client: Any) -> None:
    """Interrupted or terminated, the lab removes its container; SIGKILLed, the next lab's start removes it."""
    lab = subprocess.Popen([*LAB, "run", "1", "--stress", "--trials", "100000"], env=ENV, cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert lab.stdout is not None
        first = lab.stdout.readline()  # printed once the container answers
        assert first.startswith("postgres: testcontainers "), first + lab.communicate()[1]
        owner = container._owner(lab.pid)
        [running] = _labs_containers(client, owner)
        lab.send_signal(sig)
        _, err = lab.communicate(timeout=60)
    finally:
        lab.kill()
        lab.wait()
    if sig != signal.SIGKILL:
        assert lab.returncode == 130, err
        assert _labs_containers(client, owner) == []
        return
    if "Ryuk off" in first:  # nothing of the lab ran after SIGKILL, and no reaper: the container is still there
        assert _labs_containers(client, owner) == [running]
    with provision(ENV):  # the next lab's start removes the containers of labs that are gone
        assert _labs_containers(client, owner) == []


def test_the_oldest_testcontainers_pyproject_admits_runs_a_journey_too(client: Any) -> None:
    """`lab run 1` on the floor of pyproject's testcontainers range, installed beside the newest, exits 0."""
    floor = os.environ.get("LAB_TESTCONTAINERS_FLOOR", "")
    assert floor, "LAB_TESTCONTAINERS_FLOOR names a dir with the oldest testcontainers (tests/container/leg.sh)"
    admitted = re.search(r'"testcontainers>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    done = _lab("run", "1", env={**ENV, "PYTHONPATH": floor})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    used = re.match(r"postgres: testcontainers ([\d.]+), ", done.stdout)
    assert admitted and used and Version(used.group(1)) == Version(admitted.group(1)), done.stdout[:300]
