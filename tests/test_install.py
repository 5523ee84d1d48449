"""Installed as a user installs it: the lab from its checkout into a fresh venv beside the example app, then pytest.

Nothing of this repository's venv is used: the install command is the one docs/PYTEST.md gives, and
the server is whatever the plugin finds on its own (here, the embedded one from the wheel), so this
is what a new user's first ``pytest`` does. A fresh venv costs a pip install of the lab and its
dependencies, so this runs in ``make test-install`` (called by .ci/run), not in ``make test``.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "PYTEST.md"
INSTALL = re.compile(r"```sh\n(.*?)```", re.S)

pytestmark = pytest.mark.install


def test_a_fresh_venv_finds_the_race_in_the_buggy_app_and_passes_the_fixed_one(tmp_path: Path) -> None:
    """`pip install '<checkout>[pytest]'` then `pytest` in the example app: 4 attacks red on buggy/, green on fixed/."""
    venv, app = tmp_path / "venv", tmp_path / "orders"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LAB_DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    (install,) = INSTALL.findall(DOC.read_text())
    for line in install.strip().splitlines():
        argv = shlex.split(line.replace("<checkout>", str(ROOT)))
        assert argv[0] == "pip", f"the guide's install block runs pip only: {line!r}"
        subprocess.run([str(venv / "bin" / "pip"), *argv[1:], "--quiet"], env=env, cwd=tmp_path, check=True)
    shutil.copytree(ROOT / "examples" / "orders", app, ignore=shutil.ignore_patterns("frontrun", "__pycache__"))
    done = subprocess.run([str(venv / "bin" / "pytest"), "-rA"], cwd=app, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600, check=False)
    out = done.stdout
    assert done.returncode == 1, out
    ended = dict(
        (test, outcome) for outcome, test in re.findall(r"^(PASSED|FAILED) tests/test_orders.py::(\S+)", out, re.M)
    )
    assert ended == {
        f"test_{name}[{version}]": "FAILED" if version == "buggy" else "PASSED"
        for name in ("a_retried_order_is_made_and_charged_once", "an_order_survives_a_crash_and_its_retry",
                     "many_retries_at_once_make_one_order", "a_redelivered_event_reserves_once")
        for version in ("buggy", "fixed")
    }, out
    assert "✗ anomaly: request r-1 made 2 orders" in out and "postgres: embedded" in out, out
