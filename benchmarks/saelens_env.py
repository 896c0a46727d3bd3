"""A separate virtual environment with SAELens, for the benchmarks and slow tests that compare against it.

    from benchmarks.saelens_env import saelens_python, run_in_saelens
    run_in_saelens("import sae_lens; print(sae_lens.__version__)").stdout

    python benchmarks/saelens_env.py            # create it (if needed) and print its python and versions

`sae-lens` 6.x requires `transformer-lens < 4`, and our `.venv` pins TransformerLens 4.3, so SAELens lives
in its own environment and we talk to it through files (SAEs, activations) and subprocesses. The env is
created once under ~/.cache/interp/saelens-venv (or $INTERP_SAELENS_VENV) and reused; a stamp file written
after a complete install records what was installed, so a half-finished install (killed, offline) is
redone rather than trusted. torch is the CPU wheel pinned by constraints.txt: without the pin pip pulls
several GB of CUDA wheels. This is a development tool: the toolkit itself never touches the network.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
# Pinned so interop results are reproducible; the source we checked our semantics against is this release.
SAELENS_SPEC = os.environ.get("INTERP_SAELENS_SPEC", "sae-lens==6.54.12")
ENV_DIR = Path(os.environ.get("INTERP_SAELENS_VENV", Path.home() / ".cache" / "interp" / "saelens-venv"))
STAMP = ENV_DIR / ".interp-saelens-stamp"


class SAELensEnvError(RuntimeError):
    """The SAELens environment could not be created (usually: no network to PyPI); the message says why."""


def _python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _wanted() -> dict:
    return {"spec": SAELENS_SPEC, "constraints": CONSTRAINTS.read_text(), "python": sys.version.split()[0]}


def _ready() -> bool:
    try:
        return _python(ENV_DIR).exists() and json.loads(STAMP.read_text()) == _wanted()
    except (OSError, ValueError):
        return False


def _pip(*args: str) -> None:
    cmd = [str(_python(ENV_DIR)), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SAELensEnvError(f"installing into {ENV_DIR} failed ({' '.join(cmd)}):\n"
                              f"{done.stdout[-3000:]}{done.stderr[-3000:]}")


def saelens_python() -> Path:
    """The SAELens environment's python, creating the environment first if it is missing or incomplete."""
    if _ready():
        return _python(ENV_DIR)
    ENV_DIR.parent.mkdir(parents=True, exist_ok=True)
    # A lock beside the env, because a benchmark and a test (or two engineers) may both try to build it.
    with open(ENV_DIR.parent / (ENV_DIR.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready():
            return _python(ENV_DIR)
        if ENV_DIR.exists():
            shutil.rmtree(ENV_DIR)
        print(f"creating the SAELens environment in {ENV_DIR} ({SAELENS_SPEC}, CPU torch); this takes minutes",
              file=sys.stderr, flush=True)
        venv.EnvBuilder(with_pip=True).create(ENV_DIR)
        # torch first, alone, so the CPU wheel (PIP_FIND_LINKS / the constraint) is what satisfies sae-lens.
        _pip("-c", str(CONSTRAINTS), "torch")
        _pip("-c", str(CONSTRAINTS), SAELENS_SPEC)
        STAMP.write_text(json.dumps(_wanted()))
    return _python(ENV_DIR)


def run_in_saelens(script: str, *args: str, check: bool = True, timeout: float | None = None,
                   env: dict | None = None, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `script` with the SAELens environment's python and return the finished process (text output captured).

    script: a path to a .py file, or Python source (run with `-c`). args go to the script's sys.argv[1:].
    The child gets HF_HUB_OFFLINE=1 unless `env` says otherwise, and no PYTHONPATH: our packages (`models`,
    `interp`) must not shadow anything there. Source given inline runs with `-P`, so the working directory
    is not on its sys.path either. check: raise CalledProcessError (with the child's stderr) on failure.
    """
    python = saelens_python()
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.update(env or {})
    is_file = script.endswith(".py") and "\n" not in script and Path(script).is_file()
    cmd = [str(python), script, *args] if is_file else [str(python), "-P", "-c", script, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env, cwd=cwd)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd[:2] + ["..."], done.stdout,
                                            f"{done.stderr}\n(the SAELens env's script failed; stderr above)")
    return done


def versions() -> dict:
    """Versions of sae-lens, transformer-lens and torch inside the environment."""
    out = run_in_saelens("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
                         "('sae-lens', 'transformer-lens', 'torch')}))")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(saelens_python())
    print(versions())
