"""Open report pages in headless Chromium with networking off, and say what rendered.

A helper for tests (not a test file itself)::

    with Browser() as browser:
        result = browser.render(Path("reports/heads/index.html"), screenshot=Path("shot.png"))

`render` returns a dict: every request the page made (blocked, but recorded), how many
circuitsvis view containers there are and how many React rendered into, how many
`figure.plot` SVGs there are and how many have a non-zero size, SEVERE console messages
and the page title. Needs Debian's `chromium` and `chromium-driver` packages.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

CHROMIUM = os.environ.get("INTERP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("INTERP_CHROMEDRIVER", "/usr/bin/chromedriver")
PACKAGES = "chromium chromium-driver"
MISSING_MESSAGE = (
    f"headless Chromium is needed to check the report pages but {CHROMIUM} or {CHROMEDRIVER} is missing: "
    f"install the Debian packages with `apt-get install -y --no-install-recommends {PACKAGES}` "
    "(or set INTERP_SKIP_BROWSER=1 to skip these tests)"
)

# URL schemes that never leave the machine.
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")

# The view containers interp.views.View writes, and the figures interp.report.Page writes
# (outermost SVGs only: an SVG nested in an SVG is part of its parent's drawing).
_VIEWS = "div.circuitsvis[data-component]"
_FIGURES = "figure.plot svg:not(svg svg)"

_PROBE = f"""
const views = Array.from(document.querySelectorAll({json.dumps(_VIEWS)}));
const svgs = Array.from(document.querySelectorAll({json.dumps(_FIGURES)}));
const sized = el => {{ const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; }};
// A canvas has ink once any pixel is not fully transparent (charts draw after React renders).
const inked = c => {{
  if (!c.width || !c.height) return false;
  try {{
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) return true;
    return false;
  }} catch (e) {{ return true; }}  // not a 2d canvas (or unreadable): nothing to say
}};
const painted = el => el.childElementCount > 0 && Array.from(el.querySelectorAll("canvas")).every(inked);
return {{
  readyState: document.readyState,
  title: document.title,
  views: views.length,
  views_rendered: views.filter(el => el.childElementCount > 0).length,
  views_sized: views.filter(el => el.childElementCount > 0 && sized(el)).length,
  views_painted: views.filter(painted).length,
  view_components: views.map(el => el.dataset.component),
  svgs: svgs.length,
  svgs_sized: svgs.filter(sized).length,
  width: Math.ceil(Math.max(document.documentElement.scrollWidth, document.body ? document.body.scrollWidth : 0)),
  height: Math.ceil(Math.max(document.documentElement.offsetHeight, document.body ? document.body.scrollHeight : 0)),
}};
"""


def chromium_available() -> bool:
    """Whether the Chromium browser and its WebDriver are installed (and runnable)."""
    def runnable(p: str) -> bool:
        return (Path(p).is_file() and os.access(p, os.X_OK)) or shutil.which(p) is not None

    return runnable(CHROMIUM) and runnable(CHROMEDRIVER)


def is_local(url: str) -> bool:
    return url.startswith(LOCAL_SCHEMES)


def remote_requests(result: dict) -> list[str]:
    """The requests in a `render` result that would have left the machine."""
    return [u for u in result["requests"] if not is_local(u)]


class Browser:
    """One headless Chromium, networking off, reused for many pages (start-up costs a second or two)."""

    def __init__(self, width: int = 1280, height: int = 2000, timeout: float = 20.0,
                 max_screenshot_height: int = 16000) -> None:
        if not chromium_available():
            raise RuntimeError(MISSING_MESSAGE)
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--window-size={width},{height}", "--hide-scrollbars",
            # No way out: every http(s) request goes to a closed local port, no name resolves.
            "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost",
            # And Chromium's own chatter stays off too.
            "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
            "--metrics-recording-only", "--disable-features=Translate,OptimizationHints,MediaRouter",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        options.set_capability("goog:perfLoggingPrefs", {"enableNetwork": True, "enablePage": False})
        self.timeout = timeout
        self.width, self.height = width, height
        self.max_screenshot_height = max_screenshot_height
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        # Loading a page runs its inline scripts; a page with big circuitsvis views can take
        # ten seconds or more on a busy machine.
        self.driver.set_page_load_timeout(max(120.0, 3 * timeout))
        # Belt and braces: the DevTools network emulation is offline as well.
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.offline_emulation = True
        try:
            self.driver.execute_cdp_cmd(
                "Network.emulateNetworkConditions",
                {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
            )
        except Exception:  # a Chromium that dropped the (deprecated) command: the flags above still hold
            self.offline_emulation = False

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self.driver is not None:
            try:
                self.driver.quit()
            finally:
                self.driver = None

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ one page
    def _drain_logs(self) -> None:
        for kind in ("performance", "browser"):
            self.driver.get_log(kind)

    def _requests(self) -> list[str]:
        urls = []
        for entry in self.driver.get_log("performance"):
            try:
                message = json.loads(entry["message"])["message"]
            except (KeyError, ValueError):
                continue
            method, params = message.get("method"), message.get("params", {})
            if method == "Network.requestWillBeSent":
                urls.append(params["request"]["url"])
            elif method == "Network.webSocketCreated":
                urls.append(params["url"])
        return urls

    def render(self, path: Path, screenshot: Path | None = None, timeout: float | None = None) -> dict:
        """Open `path` from a file:// URL, wait for its scripts, and report what rendered.

        Waits for the load event, then up to `timeout` (default: the browser's) seconds
        for every circuitsvis view to be rendered and drawn.
        """
        timeout = self.timeout if timeout is None else timeout
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(path)
        driver = self.driver
        driver.get("about:blank")
        self._drain_logs()

        start = time.monotonic()
        driver.get(path.as_uri())  # returns at the load event (inline scripts have run), within the page-load timeout
        loaded = time.monotonic()
        probe = driver.execute_script(_PROBE)
        # React may render views into their divs after that, and their charts draw later
        # still: poll until every view has children and ink on its canvases, or `timeout`
        # seconds have passed.
        while time.monotonic() - loaded < timeout:
            if probe["readyState"] == "complete" and probe["views_painted"] == probe["views"]:
                break
            time.sleep(0.1)
            probe = driver.execute_script(_PROBE)
        done = time.monotonic()
        if screenshot is not None:  # let the compositor catch up before taking the picture
            driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "requestAnimationFrame(() => requestAnimationFrame(() => done()));"
            )

        result = {
            "path": str(path),
            "url": path.as_uri(),
            "title": probe["title"],
            "ready_state": probe["readyState"],
            "views": probe["views"],
            "views_rendered": probe["views_rendered"],
            "views_sized": probe["views_sized"],
            "views_painted": probe["views_painted"],
            "view_components": probe["view_components"],
            "svgs": probe["svgs"],
            "svgs_sized": probe["svgs_sized"],
            "page_size": (probe["width"], probe["height"]),
            "load_seconds": round(loaded - start, 2),
            "seconds": round(done - start, 2),
            "offline_emulation": self.offline_emulation,
        }
        result["requests"] = self._requests()
        result["remote_requests"] = [u for u in result["requests"] if not is_local(u)]
        logs = driver.get_log("browser")
        result["console_errors"] = [e.get("message", "") for e in logs if e.get("level") == "SEVERE"]
        result["console_warnings"] = [e.get("message", "") for e in logs if e.get("level") == "WARNING"]
        if screenshot is not None:
            result["screenshot"] = str(self.screenshot(Path(screenshot), probe["width"], probe["height"]))
        return result

    def screenshot(self, path: Path, width: int | None = None, height: int | None = None) -> Path:
        """The whole page (up to max_screenshot_height pixels tall) as a PNG."""
        if width is None or height is None:
            probe = self.driver.execute_script(_PROBE)
            width, height = probe["width"], probe["height"]
        width = max(1, min(int(width), 4 * self.width))
        height = max(1, min(int(height), self.max_screenshot_height))
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "fromSurface": True,
             "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def render_page(path: Path, screenshot: Path | None = None) -> dict:
    """`Browser.render` for one page, in a browser of its own (use `Browser` for many pages)."""
    with Browser() as browser:
        return browser.render(path, screenshot)
