"""Build this project's wheel the way a cluster image would (`pip wheel .`)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def build_project_wheel(tmp: Path) -> Path:
    """Wheel built from a clean copy of the sources (no venv, no caches)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "serve_app.py"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("deployments", "mmdet_ls"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"), str(src)],
                   check=True, timeout=300)
    (wheel,) = (tmp / "wheel").glob("*.whl")
    return wheel
