"""Open every page of the built book in headless Chromium, as a reader would, and check it.

    make check-book                       # builds the book, then runs this script
    python scripts/check_book.py [--html _build/html] [--out _build/screenshots] [--width 1400]

Each page of the built book is opened from its file, with the network cut off (Chromium
resolves no host name), the way someone reads a downloaded copy of the book without
internet (``index.html``, a redirect to the first page, is skipped). Once the page, its
images, its fonts and MathJax have finished, the script saves a full-page screenshot to
OUT/<page>.png and reports, one line per problem:

- an image that did not load (``naturalWidth`` 0);
- raw TeX in the visible text (``\\(``, ``\\[`` or ``$$`` outside code): maths that MathJax
  did not typeset, or MathJax that did not load at all; and formulas MathJax rendered as an
  error (an unknown macro);
- a chapter page (``notebooks/*``) without its Colab launch link.

It also notes tables wider than the page (the reader has to scroll sideways); a note is not a
failure. The exit status is 0 when no page has a problem, 1 when some page has one, and 2
when the browser cannot be started (the message says what to install).

Why a script of our own: the checks are about this book's pages (its MathJax, its launch
buttons); Selenium drives the browser and Chromium renders, nothing else is needed.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLAB = "https://colab.research.google.com/"
MAX_TEX = 5  # raw TeX spots listed per page; the rest are counted on one line
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL = """\
To run this check, install:
  - the Python driver:  .venv/bin/pip install -e ".[check]"   (Selenium)
  - Chromium and its driver:
      Debian/Ubuntu:    sudo apt-get install chromium chromium-driver
      elsewhere:        Chrome or Chromium; Selenium fetches the matching chromedriver when
                        online, or put chromedriver on PATH (or set CHROMEDRIVER=/path)
  Set CHROMIUM=/path/to/browser when the browser is not on PATH under a usual name."""

# Waits until MathJax (when the page loads it) has typeset everything and the fonts are in.
WAIT_JS = """
const done = arguments[arguments.length - 1];
const limit = arguments[0] * 1000, t0 = Date.now();
const usesMathJax = !!document.querySelector('script[src*="mathjax"], script[src*="MathJax"]');
const fonts = () => (document.fonts ? document.fonts.ready : Promise.resolve());
(function poll() {
  const mj = window.MathJax;
  if (!usesMathJax) {
    fonts().then(() => done("none"));
  } else if (mj && mj.startup && mj.startup.promise) {
    mj.startup.promise.then(fonts).then(() => done("ok"), (e) => done("error: " + e));
  } else if (Date.now() - t0 > limit) {
    const src = document.querySelector('script[src*="mathjax"], script[src*="MathJax"]').src;
    done("MathJax did not load from " + src);
  } else {
    setTimeout(poll, 100);
  }
})();
"""

# Lazy images below the fold load too, so that the check and the screenshot see them.
IMAGES_JS = """
const done = arguments[arguments.length - 1];
const limit = arguments[0] * 1000, t0 = Date.now();
for (const img of document.images) img.loading = "eager";
(function poll() {
  if (Array.from(document.images).every((i) => i.complete) || Date.now() - t0 > limit) {
    done(Array.from(document.images)
      .filter((i) => !i.complete || i.naturalWidth === 0)
      .map((i) => i.getAttribute("src") || i.currentSrc || "(no src)"));
  } else {
    setTimeout(poll, 100);
  }
})();
"""

# Visible text that still holds TeX delimiters, outside code and typeset maths.
RAW_TEX_JS = """
const skip = "pre, code, script, style, textarea, noscript, mjx-container, .MathJax, .highlight";
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
const hits = [];
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const el = node.parentElement;
  if (!el || el.closest(skip) || el.getClientRects().length === 0) continue;
  const text = node.textContent;
  for (const token of ["\\\\(", "\\\\[", "$$"]) {
    const at = text.indexOf(token);
    if (at >= 0) {
      hits.push(token + " in: " + text.slice(Math.max(0, at - 30), at + 50).replace(/\\s+/g, " ").trim());
      break;
    }
  }
}
return hits;
"""

# Formulas that MathJax could not typeset, shown in red: a TeX error, or an unknown macro
# (MathJax writes its name as red text; its MathML copy for screen readers says so).
MATH_ERRORS_JS = """
const errors = Array.from(document.querySelectorAll("mjx-merror")).map(
  (e) => e.getAttribute("data-mjx-error") || e.textContent);
const unknown = Array.from(document.querySelectorAll('mjx-assistive-mml mtext[mathcolor="red"]'))
  .map((e) => e.textContent).filter((t) => t.startsWith("\\\\")).map((t) => "unknown macro " + t);
return errors.concat(unknown);
"""

COLAB_JS = f"""
return Array.from(document.querySelectorAll('a[href^="{COLAB}"]')).map((a) => a.href);
"""

WIDE_TABLES_JS = """
const out = [];
document.querySelectorAll("article table, main table").forEach((t, i) => {
  const box = t.parentElement.closest("article, main") || document.body;
  const over = t.getBoundingClientRect().right - box.getBoundingClientRect().right;
  const scroller = t.parentElement;
  const hidden = scroller.scrollWidth - scroller.clientWidth;
  if (over > 1 || hidden > 1) {
    const head = (t.querySelector("tr") || t).innerText.replace(/\\s+/g, " ").slice(0, 60);
    out.push(`table ${i + 1} (${head}) is ${Math.round(Math.max(over, hidden))} px wider than the page`);
  }
});
return out;
"""


def pages(html: Path) -> list[Path]:
    """The book's pages: every .html file except Sphinx's assets and redirect stubs."""
    out = []
    for p in sorted(html.rglob("*.html")):
        rel = p.relative_to(html)
        if rel.parts[0] in ("_static", "_sources", "_images"):
            continue
        if 'http-equiv="Refresh"' in p.read_text(errors="replace")[:500]:
            continue  # index.html: a redirect to the first page, which is checked itself
        out.append(p)
    return out


def cannot_start(why: str) -> None:
    print(f"check_book: {why}\n{INSTALL}", file=sys.stderr)
    raise SystemExit(2)


def start_browser(width: int, height: int):
    """A headless Chromium under Selenium with no network; exits 2 saying what to install."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
    except ImportError:
        cannot_start("Selenium is not installed")
    opts = webdriver.ChromeOptions()
    binary = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if binary and not Path(binary).exists():
        cannot_start(f"no browser at {binary} (CHROMIUM)")
    if binary:
        opts.binary_location = binary
    for arg in (
        "--headless=new",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # The reader without internet: no host name resolves (files still load).
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--allow-file-access-from-files",
    ):
        opts.add_argument(arg)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        opts.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    driver_path = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    service = webdriver.ChromeService(executable_path=driver_path) if driver_path else None
    try:
        return webdriver.Chrome(options=opts, service=service)
    except WebDriverException as e:
        first = (e.msg or str(e)).strip().splitlines()[0] if (e.msg or str(e)) else repr(e)
        found = f"browser: {binary or 'none found'}; chromedriver: {driver_path or 'none found'}"
        cannot_start(f"could not start Chromium ({first})\n{found}")


def screenshot(driver, path: Path, width: int) -> None:
    """A full-page PNG: the viewport is made as tall as the page for the capture (Chromium's
    capture beyond the viewport shifts this theme's layout sideways)."""
    height = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
    metrics = {"width": width, "height": max(1, int(height)), "deviceScaleFactor": 1}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "mobile": False})
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def check_page(driver, page: Path, rel: Path, out: Path, width: int, timeout: float) -> tuple:
    """Open one page, save its screenshot, and return (problems, notes)."""
    driver.get(page.resolve().as_uri())
    problems, notes = [], []
    missing = driver.execute_async_script(IMAGES_JS, timeout)
    problems += [f"image did not load: {src}" for src in missing]
    mathjax = driver.execute_async_script(WAIT_JS, timeout)
    if mathjax not in ("ok", "none"):
        problems.append(mathjax)
    hits = driver.execute_script(RAW_TEX_JS)
    problems += [f"raw TeX left untypeset: {hit}" for hit in hits[:MAX_TEX]]
    if len(hits) > MAX_TEX:
        problems.append(f"raw TeX left untypeset in {len(hits) - MAX_TEX} more places")
    problems += [f"MathJax error: {e}" for e in driver.execute_script(MATH_ERRORS_JS)]
    if rel.parts[0] == "notebooks":
        want = f"notebooks/{rel.stem}.ipynb"
        links = driver.execute_script(COLAB_JS)
        if not any(want in href for href in links):
            problems.append(f"no Colab launch link to {want} (found: {links or 'none'})")
    notes += driver.execute_script(WIDE_TABLES_JS)
    screenshot(driver, out / rel.with_suffix(".png"), width)
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", default=str(ROOT / "_build" / "html"), help="the built book")
    ap.add_argument("--out", default=str(ROOT / "_build" / "screenshots"), help="PNGs go here")
    ap.add_argument("--width", type=int, default=1400, help="window width in CSS pixels")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait per page")
    args = ap.parse_args(argv)
    html, out = Path(args.html), Path(args.out)
    if not (html / "index.html").exists():
        print(f"check_book: no built book in {html}: run `make book` first", file=sys.stderr)
        return 2
    for old in out.rglob("*.png") if out.exists() else []:
        old.unlink()  # screenshots of pages that no longer exist would mislead
    driver = start_browser(args.width, 900)
    driver.set_page_load_timeout(args.timeout * 2)
    driver.set_script_timeout(args.timeout * 2)
    n_problems, t0 = 0, time.time()
    try:
        found = pages(html)
        for page in found:
            rel = page.relative_to(html)
            problems, notes = check_page(driver, page, rel, out, args.width, args.timeout)
            for p in problems:
                print(f"FAIL {rel}: {p}")
            for n in notes:
                print(f"note {rel}: {n}")
            if not problems:
                print(f"ok   {rel}")
            n_problems += len(problems)
            sys.stdout.flush()
    finally:
        driver.quit()
    print(
        f"{len(found)} pages checked in {time.time() - t0:.0f} s, screenshots in {out}: "
        + (f"{n_problems} problem(s)" if n_problems else "no problems")
    )
    return 1 if n_problems else 0


if __name__ == "__main__":
    sys.exit(main())
