"""Open a report in a real browser: headless Chromium screenshots it and counts images that failed to load.

``screenshot(html, png)`` renders the page to a PNG; ``broken_images(html)`` loads a copy of the page with a small
script that, once the page has loaded, writes into the DOM how many ``<img>`` there are and which ones have no
pixels (``naturalWidth == 0``); Chromium's ``--dump-dom`` then hands the DOM back. Debian's ``chromium`` package is
enough (``apt-get install chromium``). Command line::

    python -m analysis.browser REPORT.html OUT.png     # exit 1 if an image is broken
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["find_chromium", "chromium_version", "chromium_args", "screenshot", "broken_images", "main"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_MARKER = "forgesim-image-check"
_CHECK_SCRIPT = f"""<script>
window.addEventListener('load', function () {{
  var broken = [], imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {{
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken.push(imgs[i].alt || imgs[i].src.slice(0, 80));
  }}
  var out = document.createElement('pre');
  out.id = '{_MARKER}';
  out.textContent = JSON.stringify({{total: imgs.length, broken: broken}});
  document.body.appendChild(out);
}});
</script>"""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    return next((p for p in map(shutil.which, _CANDIDATES) if p), None)


def _require_chromium() -> str:
    """``find_chromium``, or a FileNotFoundError saying how to install it."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium found on PATH (Debian: apt-get install chromium)")
    return exe


def chromium_version(timeout: float = 30.0) -> str:
    """The browser's own ``--version`` line (e.g. ``Chromium 131.0.6778.204 built on Debian ...``)."""
    exe = _require_chromium()
    done = _run([exe, "--version"], timeout)
    return (done.stdout.strip().splitlines() or [exe])[0]


def chromium_args(profile: Path) -> list[str]:
    """Flags for a headless run that works as root and in containers, with its own throw-away profile."""
    return [_require_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--no-first-run", "--mute-audio", f"--user-data-dir={profile}"]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"chromium exited with {done.returncode}: {' | '.join(tail)}")
    return done


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1400, height: int = 4000,
               timeout: float = 120.0) -> Path:
    """Render ``html_path`` in headless Chromium to ``png_path`` (a ``width`` × ``height`` window)."""
    src, dest = Path(html_path).resolve(), Path(png_path).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="forgesim-chromium-") as profile:
        _run(chromium_args(Path(profile)) + [f"--screenshot={dest}", f"--window-size={width},{height}",
                                             "--virtual-time-budget=10000", src.as_uri()], timeout)
    if not dest.is_file() or dest.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {dest}")
    return dest


def broken_images(html_path: str | Path, timeout: float = 120.0) -> tuple[int, list[str]]:
    """Load ``html_path`` in headless Chromium; return (number of ``<img>``, alt texts of those that did not load).

    The page is loaded from a temporary copy with the check script appended and a ``<base>`` pointing at the
    original's folder, so relative image paths resolve as they would for the original.
    """
    src = Path(html_path).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    text = src.read_text(encoding="utf-8")
    base = f'<base href="{src.parent.as_uri()}/">'
    text = re.sub(r"<head([^>]*)>", lambda m: m.group(0) + base, text, count=1) if "<head" in text else base + text
    text = text.replace("</body>", _CHECK_SCRIPT + "</body>") if "</body>" in text else text + _CHECK_SCRIPT
    with tempfile.TemporaryDirectory(prefix="forgesim-chromium-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(text, encoding="utf-8")
        done = _run(chromium_args(Path(tmp) / "profile") + ["--virtual-time-budget=10000", "--dump-dom",
                                                            page.as_uri()], timeout)
    found = re.search(rf'<pre id="{_MARKER}">(.*?)</pre>', done.stdout, re.S)
    if found is None:
        raise RuntimeError("the page did not finish loading in chromium (no image check in the dumped DOM)")
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return int(result["total"]), list(result["broken"])


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.browser REPORT.html OUT.png``: screenshot and image check; exit 1 if one is broken."""
    p = argparse.ArgumentParser(prog="python -m analysis.browser", description=__doc__.splitlines()[0])
    p.add_argument("html", help="report.html to open")
    p.add_argument("png", help="where the screenshot goes")
    p.add_argument("--width", type=int, default=1400, help="window width in px (default 1400)")
    p.add_argument("--height", type=int, default=4000, help="window height in px (default 4000)")
    args = p.parse_args(argv)
    try:
        shot = screenshot(args.html, args.png, args.width, args.height)
        total, broken = broken_images(args.html)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"analysis.browser: error: {exc}", file=sys.stderr)
        return 2
    print(f"screenshot: {shot}")
    print(f"images: {total}, broken: {len(broken)}" + (f" ({', '.join(broken)})" if broken else ""))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
