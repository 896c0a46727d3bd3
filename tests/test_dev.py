"""`python3 dev.py test` on a machine that has only Python: the browser set-up, both branches.

dev.py is loaded from its file (it is a script, not a package module); the install step is
stubbed, so nothing is installed by these tests.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

DEV = Path(__file__).resolve().parents[1] / "dev.py"


@pytest.fixture
def dev():
    spec = importlib.util.spec_from_file_location("dev_script", DEV)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ok(cmd, **kwargs):
    return subprocess.CompletedProcess(cmd, 0)


def test_installs_the_browser_as_root(dev, monkeypatch):
    state = {"installed": False}
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if "install" in cmd:
            state["installed"] = True
        return _ok(cmd)

    monkeypatch.setattr(dev, "browser_installed", lambda: state["installed"])
    monkeypatch.setattr(dev, "_privilege", lambda: [])
    monkeypatch.setattr(dev.shutil, "which", lambda name: "/usr/bin/" + name)
    assert dev.ensure_browser(run=run) == {}
    assert calls[0] == ["apt-get", "update", "-q"]
    assert calls[1][:2] == ["apt-get", "install"] and calls[1][-2:] == ["chromium", "chromium-driver"]


def test_without_privileges_the_browser_tests_are_skipped_with_one_line(dev, monkeypatch, capsys):
    monkeypatch.delenv("INTERP_REQUIRE_BROWSER", raising=False)
    monkeypatch.setattr(dev, "browser_installed", lambda: False)
    monkeypatch.setattr(dev, "_privilege", lambda: None)
    env = dev.ensure_browser(run=lambda *a, **k: pytest.fail("must not try to install"))
    assert env["INTERP_SKIP_BROWSER"] == "1"
    assert "apt-get install -y --no-install-recommends chromium chromium-driver" in env["INTERP_SKIP_BROWSER_REASON"]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("dev.py: browser tests skipped")


def test_a_failed_install_skips_and_ci_makes_it_an_error(dev, monkeypatch):
    monkeypatch.setattr(dev, "browser_installed", lambda: False)
    monkeypatch.setattr(dev, "_privilege", lambda: ["sudo", "-n"])
    monkeypatch.setattr(dev.shutil, "which", lambda name: "/usr/bin/" + name)
    failing = lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 100)  # noqa: E731
    monkeypatch.delenv("INTERP_REQUIRE_BROWSER", raising=False)
    assert "installing it failed" in dev.ensure_browser(run=failing)["INTERP_SKIP_BROWSER_REASON"]
    monkeypatch.setenv("INTERP_REQUIRE_BROWSER", "1")
    with pytest.raises(SystemExit, match="INTERP_REQUIRE_BROWSER"):
        dev.ensure_browser(run=failing)


def test_nothing_to_do_when_the_browser_is_there(dev, monkeypatch):
    monkeypatch.setattr(dev, "browser_installed", lambda: True)
    assert dev.ensure_browser(run=lambda *a, **k: pytest.fail("must not install")) == {}


def test_ci_calls_the_readme_command():
    ci = (DEV.parent / ".ci" / "run").read_text()
    readme = (DEV.parent / "README.md").read_text()
    assert "python3 dev.py test" in ci and "python3 dev.py test" in readme.splitlines()[2]
