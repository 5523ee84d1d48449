"""The container path: testcontainers' PostgresContainer, on a Docker daemon that answered a ping.

No container may outlive the lab. testcontainers' own answer is Ryuk, a reaper that is itself an
image to pull; where it cannot be had (no registry), it is turned off and the lab does Ryuk's job:
every container it starts carries a label naming its process (boot id, pid, start time), it is
removed on every exit path Python sees, and each start removes the labelled containers whose
process is gone (a lab that was SIGKILLed), as stale temp dirs are reaped on the embedded path.

What the lab sends stays on this machine: with a local daemon (a Unix socket) the port is published
on 127.0.0.1 alone and the client connects through it, whatever testcontainers would guess (inside
a container it guesses the default gateway).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lab.errors import LabError

IMAGE = "postgres:17.6-alpine"  # pinned: a moving tag would change the lab's behaviour under us
OWNER = "org.idempotency-lab.owner"  # the label: which process on which boot started the container
RYUK_PULL_TIMEOUT = 30.0  # seconds a pull of Ryuk's image may take before we do without it
IN_MEMORY = "/run/idempotency-lab"  # a tmpfs in the container; PGDATA goes in it
POLL_INTERVAL = 0.1  # testcontainers polls readiness once a second by default: most of a start


def image(env: Mapping[str, str]) -> str:
    return env.get("LAB_POSTGRES_IMAGE", "").strip() or IMAGE


def postgres_container_class() -> Any:
    """PostgresContainer from wherever this testcontainers keeps it: testcontainers.community.postgres
    since 4.15, testcontainers.postgres before (4.15 still has it, as a deprecated alias)."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        from testcontainers.postgres import PostgresContainer
    return PostgresContainer


@contextlib.contextmanager
def container(docker_host: str, image: str, settings: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """A started PostgreSQL container: (its DSN for asyncpg, the start-up line). Removed on the way out."""
    import docker  # lazily: the embedded path, the default, never pays for the Docker SDK
    from testcontainers.core.config import testcontainers_config as config

    client_kw = {"environment": {"DOCKER_HOST": docker_host}}  # not os.environ: provision() was given the host
    try:
        client = docker.from_env(**client_kw)
        _remove_orphans(client)
        ryuk = _ryuk(client, docker_host, config)
    except Exception as e:  # docker-py's own errors, and requests' beneath them
        raise LabError(f"the Docker daemon at {docker_host} answered a ping, then failed: {_one_line(e)}") from e
    config.sleep_time = POLL_INTERVAL
    config.max_tries = int(60 / POLL_INTERVAL)  # the same minute testcontainers waits by default
    local = docker_host.startswith("unix://")
    if local:
        _connect_through_loopback(config)
    owner = _owner(os.getpid())
    pg = postgres_container_class()(
        image, username="lab", password=secrets.token_hex(8), dbname="lab", driver=None,
        docker_client_kw=client_kw, labels={OWNER: owner},
    )  # fmt: skip
    if local:
        for port in list(pg.ports):
            pg.ports[port] = ("127.0.0.1",)  # docker-py: publish on loopback only, any free port
    pg.with_command(["postgres", *(arg for name, value in settings.items() for arg in ("-c", f"{name}={value}"))])
    # Throwaway, as the embedded server's: no fsync in initdb, and PGDATA in memory, in a tmpfs of its
    # own (a fresh path: docker mounts one over an image's directory with that directory's owner, which
    # the official image's postgres user is not); a cluster's ~1,000 files cost 0.4 s on this disk.
    pg.with_env("POSTGRES_INITDB_ARGS", "--no-sync")
    pg.with_env("PGDATA", f"{IN_MEMORY}/data")
    if hasattr(pg, "tmpfs"):  # 4.15 and later: {path: docker's tmpfs options}
        pg.tmpfs[IN_MEMORY] = "mode=1777"
    else:  # before: keyword arguments go straight to docker-py's containers.run
        pg.with_kwargs(**pg._kwargs, tmpfs={IN_MEMORY: "mode=1777"})

    def stop() -> None:
        if os.getpid() == _pid(owner):  # a forked child exiting must not remove its parent's container
            _remove(client, owner)

    atexit.register(stop)
    try:
        try:
            pg.start()
            dsn = pg.get_connection_url(driver=None)  # driver=None: asyncpg takes no "+psycopg2"
        except Exception as e:
            raise LabError(f"testcontainers could not start {image}: {_one_line(e)}{_log_tail(client, owner)}") from e
        version = importlib.metadata.version("testcontainers")
        yield dsn, f"postgres: testcontainers {version}, {image}, Docker daemon at {docker_host} ({ryuk})"
    finally:
        stop()  # by label, not pg.stop(): an interrupted start may have made a container pg never heard of
        atexit.unregister(stop)
        for open_client in (client, pg.get_docker_client().client):  # ours, and testcontainers' own
            with contextlib.suppress(Exception):
                open_client.close()


def _connect_through_loopback(config: Any) -> None:
    """TC_HOST=127.0.0.1 and, from 4.9 on, TESTCONTAINERS_CONNECTION_MODE=docker_host, set on the config
    itself: testcontainers reads both variables once, at import. Without the mode, 4.15 running inside
    a container connects to the bridge's gateway; without TC_HOST, 4.8 connects to the default route's."""
    config.tc_host_override = "127.0.0.1"
    with contextlib.suppress(ImportError):
        from testcontainers.core.config import ConnectionMode

        config.connection_mode_override = ConnectionMode.docker_host


def _ryuk(client: Any, docker_host: str, config: Any) -> str:
    """Use Ryuk if its image is here or can be pulled; else turn it off (what TESTCONTAINERS_RYUK_DISABLED
    does) rather than fail every start, and say so. 4.8 reads that variable once, at import, so the
    setting itself is changed too."""
    import docker

    if config.ryuk_disabled:
        return "Ryuk off: TESTCONTAINERS_RYUK_DISABLED; the lab removes what it started"
    try:
        client.images.get(config.ryuk_image)
        return "Ryuk on"
    except docker.errors.ImageNotFound:
        pass
    try:
        puller = docker.from_env(environment={"DOCKER_HOST": docker_host}, timeout=RYUK_PULL_TIMEOUT)
        with contextlib.closing(puller):
            puller.images.pull(config.ryuk_image)
        return "Ryuk on"
    except Exception:  # no registry, a refusal, a time-out: all mean the same here
        os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
        config.ryuk_disabled = True
        return f"Ryuk off: {config.ryuk_image} cannot be had; the lab removes what it started"


def _owner(pid: int) -> str:
    """This boot, this pid and its start time: a pid reused after a reboot or a wrap is not the owner."""
    return f"{_boot_id()}/{pid}/{_start_time(pid)}"


def _pid(owner: str) -> int:
    return int(owner.split("/")[1])


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: the host's name is the best we have
        return socket.gethostname()


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat, in clock ticks since boot; "" where there is no /proc or no such pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(owner: str) -> bool:
    _, pid, started = owner.split("/")
    if started:
        return _start_time(int(pid)) == started
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True


def _remove_orphans(client: Any) -> None:
    """Remove the containers of labs on this machine whose process is gone; others' are left alone."""
    boot = _boot_id()
    for found in client.containers.list(all=True, filters={"label": OWNER}):
        owner = found.labels.get(OWNER, "")
        if owner.count("/") == 2 and owner.split("/")[0] == boot and not _alive(owner):
            with contextlib.suppress(Exception):  # gone meanwhile, or being removed by another lab
                found.remove(force=True, v=True)


def _remove(client: Any, owner: str) -> None:
    with contextlib.suppress(Exception):
        for found in client.containers.list(all=True, filters={"label": f"{OWNER}={owner}"}):
            with contextlib.suppress(Exception):
                found.remove(force=True, v=True)


def _log_tail(client: Any, owner: str) -> str:
    """The container's last words, which say why it did not start (testcontainers' error does not)."""
    with contextlib.suppress(Exception):
        for found in client.containers.list(all=True, filters={"label": f"{OWNER}={owner}"}):
            lines = found.logs(tail=3).decode(errors="replace").split("\n")
            return f"; its log ends: {' | '.join(line.strip() for line in lines if line.strip())}"
    return ""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
