"""The report pages render in a real browser with networking off.

Each page is opened from a file:// URL in headless Chromium (tests/browser.py) and must:
make no request that leaves the machine, render every circuitsvis view (React puts DOM
into the view's div and its charts draw), give every `figure.plot` SVG a non-zero size,
and log no SEVERE console message. Full-page screenshots are kept as artifacts in
$INTERP_ARTIFACTS, else <repo>/artifacts/screenshots/.

Needs Debian's `chromium` and `chromium-driver` (`python3 dev.py test` installs them when it
runs as root or with sudo); without them these tests are skipped with the command to install
them, or fail when INTERP_REQUIRE_BROWSER=1 (CI). INTERP_SKIP_BROWSER=1 skips them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List

import pytest
import torch

from browser import MISSING_MESSAGE, Browser, chromium_available, is_local

REPO = Path(__file__).resolve().parents[1]


def _skip_requested() -> bool:
    return os.environ.get("INTERP_SKIP_BROWSER", "") not in ("", "0")


def _require_chromium() -> None:
    if _skip_requested():
        pytest.skip(os.environ.get("INTERP_SKIP_BROWSER_REASON")
                    or "INTERP_SKIP_BROWSER is set: report pages not checked in a browser")
    if not chromium_available():
        if os.environ.get("INTERP_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(MISSING_MESSAGE, pytrace=False)
        # A fresh machine's first run must not go red for a system package (`python3 dev.py test` installs it
        # where it can); CI sets INTERP_REQUIRE_BROWSER=1 so that a missing browser fails there.
        pytest.skip(MISSING_MESSAGE)


def artifacts_dir() -> Path:
    env = os.environ.get("INTERP_ARTIFACTS")
    return Path(env) if env else REPO / "artifacts" / "screenshots"


def attention_page(path: Path) -> Path:
    """A report page with one circuitsvis AttentionHeads view and one SVG figure."""
    from interp.plots import heatmap
    from interp.report import Page
    from interp.views import attention_heads

    tokens = ["<bos>", "The", " cat", " sat", " on", " the", " mat"]
    n = len(tokens)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, n, n, generator=gen).masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    pattern = scores.softmax(-1)
    page = Page("Attention view", run={"command": "tests/test_browser.py"})
    page.text("Three random causal heads.")
    page.view(attention_heads(pattern, tokens, ["H0", "H1", "H2"], title="Random heads"))
    page.figure(heatmap(pattern[:, -1, :], ["H0", "H1", "H2"], tokens, title="attention from the last token"))
    return page.save(path)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def report_pages(quick_tour, tmp_path_factory) -> List[Path]:
    """Every page the tour writes (`interp tour --quick`: the same pages as the full tour, on
    smaller studies), plus one page with a small attention view."""
    index = quick_tour[0]
    pages = sorted(index.parent.rglob("*.html"))
    return pages + [attention_page(tmp_path_factory.mktemp("views") / "attention.html")]


@pytest.fixture(scope="session")
def browser():
    _require_chromium()
    with Browser() as b:
        yield b


def _screenshot_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if root in path.parents else Path(path.name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(rel.with_suffix("").parts)) + ".png"


@pytest.fixture(scope="session")
def rendered(browser, report_pages) -> dict:
    """{page path: Browser.render result}, with a full-page screenshot of each kept as an artifact."""
    assert report_pages, "no report pages to check"
    root = Path(os.path.commonpath([p.resolve().parent for p in report_pages]))
    shots = artifacts_dir()
    shots.mkdir(parents=True, exist_ok=True)
    results = {}
    for page in report_pages:
        results[page] = browser.render(page, screenshot=shots / _screenshot_name(page.resolve(), root))
    summary = [{k: v for k, v in r.items() if k != "view_components"} for r in results.values()]
    (shots / "browser_results.json").write_text(json.dumps(summary, indent=1))
    return results


def _problems(rendered: dict, check) -> str:
    lines = [f"{page}: {msg}" for page, result in rendered.items() for msg in check(result)]
    return "\n".join(lines)


# ---------------------------------------------------------------------- the pages
def test_chromium_is_installed():
    _require_chromium()


@pytest.mark.slow
def test_pages_load(rendered):
    problems = _problems(rendered, lambda r: [f"document.readyState is {r['ready_state']!r}"] * (r["ready_state"] != "complete")
                         + ["no <title>"] * (not r["title"].strip()))
    assert not problems, problems


@pytest.mark.slow
def test_no_request_leaves_the_machine(rendered):
    problems = _problems(rendered, lambda r: [f"requested {u}" for u in r["requests"] if not is_local(u)])
    assert not problems, "pages asked for something beyond file:/data:/about:/blob:\n" + problems


@pytest.mark.slow
def test_circuitsvis_views_render(rendered):
    def check(r):
        if r["views"] == 0:
            return []
        out = []
        if r["views_rendered"] < r["views"]:
            out.append(f"only {r['views_rendered']} of {r['views']} circuitsvis views have rendered content")
        elif r["views_painted"] < r["views"]:
            out.append(f"only {r['views_painted']} of {r['views']} circuitsvis views drew on their canvases")
        if r["views_sized"] < r["views_rendered"]:
            out.append(f"{r['views_rendered'] - r['views_sized']} rendered views have zero size")
        return out

    problems = _problems(rendered, check)
    assert not problems, problems


@pytest.mark.slow
def test_figures_have_size(rendered):
    problems = _problems(
        rendered, lambda r: [f"{r['svgs'] - r['svgs_sized']} of {r['svgs']} figure.plot SVGs have zero size"]
        * (r["svgs_sized"] < r["svgs"])
    )
    assert not problems, problems


@pytest.mark.slow
def test_no_console_errors(rendered):
    problems = _problems(rendered, lambda r: [f"console: {m}" for m in r["console_errors"]])
    assert not problems, problems


@pytest.mark.slow
def test_screenshots_saved(rendered):
    for result in rendered.values():
        shot = Path(result["screenshot"])
        assert shot.is_file() and shot.stat().st_size > 1000, shot
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot


# ---------------------------------------------------------------------- the checks themselves
def test_attention_view_renders(browser, tmp_path):
    """Whatever `report_pages` holds, the view check is seen passing on a page with a view."""
    result = browser.render(attention_page(tmp_path / "attention.html"))
    assert result["views"] == 1 and result["view_components"] == ["AttentionHeads"]
    assert result["views_rendered"] == result["views_painted"] == result["views_sized"] == 1, result
    assert result["svgs"] == result["svgs_sized"] == 1, result
    assert [u for u in result["requests"] if not is_local(u)] == [], result["requests"]
    assert result["console_errors"] == [], result["console_errors"]


def test_remote_requests_are_recorded(browser, tmp_path):
    """A page that reaches for the network is caught (and the request goes nowhere)."""
    page = tmp_path / "remote.html"
    pixel = "data:image/gif;base64,R0lGODlhAQABAAAAACw="
    page.write_text(
        "<!DOCTYPE html><html><head><title>remote</title>"
        '<script src="https://unpkg.com/circuitsvis@1.43.2/dist/cdn/iife.js"></script></head>'
        f'<body><img id="remote" src="http://example.com/x.png"><img src="{pixel}"></body></html>',
        encoding="utf-8",
    )
    result = browser.render(page)
    remote = [u for u in result["requests"] if not is_local(u)]
    assert "https://unpkg.com/circuitsvis@1.43.2/dist/cdn/iife.js" in remote, result["requests"]
    assert "http://example.com/x.png" in remote, result["requests"]
    assert result["remote_requests"] == remote
    assert result["console_errors"], "the blocked loads should show as console errors"
    # Blocked, not fetched: the script never defined CircuitsVis and the image has no pixels.
    assert browser.driver.execute_script(
        "return typeof window.CircuitsVis === 'undefined' && document.getElementById('remote').naturalWidth === 0"
    )


def test_unrendered_view_is_caught(browser, tmp_path):
    """A view div whose script fails (here: no bundle on the page) counts as not rendered."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body>"
        '<div id="cv-1" class="circuitsvis" data-component="AttentionHeads"></div>'
        '<script>CircuitsVis.render("cv-1", CircuitsVis.AttentionHeads, {});</script>'
        '<figure class="plot"><svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"></svg></figure>'
        "</body></html>",
        encoding="utf-8",
    )
    result = browser.render(page, timeout=1.0)
    assert result["views"] == 1 and result["views_rendered"] == 0, result
    assert result["svgs"] == 1 and result["svgs_sized"] == 0, result
    assert any("CircuitsVis is not defined" in m for m in result["console_errors"]), result["console_errors"]
