"""The two set-up commands: `make serve` installs only when it must, so a
second start works offline; `make test` runs everything, `make test-fast` the unit tests;
`make annotate` passes its variables to scripts/annotate.py."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(target: str, venv: Path, *variables: str) -> str:
    if not shutil.which("make"):
        pytest.fail("make is one of the README's two set-up commands and must be installed")
    # --no-print-directory: under `make test` (CI) this make is a sub-make and
    # would otherwise print "Entering directory" lines around the commands.
    return subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}", *variables], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=30).stdout


def test_make_serve_installs_once(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    first = dry_run("serve", venv)
    assert "scripts/install.sh" in first and "scripts/serve.py serve_config.yaml" in first
    (venv / ".installed").touch()  # what the first install leaves behind
    again = dry_run("serve", venv)
    assert "scripts/install.sh" not in again and "scripts/serve.py serve_config.yaml" in again


def test_make_test_runs_everything_and_test_fast_the_unit_tests(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    for stamp in (".installed", ".installed-dev"):
        (venv / stamp).touch()
    assert "-m pytest tests" in dry_run("test", venv) and "-m unit" not in dry_run("test", venv)
    assert "-m unit" in dry_run("test-fast", venv)


def test_make_annotate_passes_its_variables_on(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    start = " ".join(dry_run("annotate", venv, "PROJECT=12", "TASKS=1,2,3", "URL=http://ml:9090").split())
    assert "scripts/install.sh" not in start
    assert "scripts/annotate.py --project 12 --tasks 1,2,3 --url http://ml:9090" in start
    assert " ".join(dry_run("annotate", venv, "CANCEL=job-1").split()).endswith("scripts/annotate.py --cancel job-1")
    assert " ".join(dry_run("annotate", venv, "LIST=1").split()).endswith("scripts/annotate.py --list")
