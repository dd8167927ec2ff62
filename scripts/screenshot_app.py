"""Save a screenshot of the running web app (scripts/app.py) with headless Chromium.

    python scripts/app.py --model outputs/demo/mllm/model &
    python scripts/screenshot_app.py --url http://127.0.0.1:7860 --out docs/app.png
    python scripts/screenshot_app.py --url http://127.0.0.1:7860 --out docs/app_draw.png \\
        --prompt "a small blue star at the top left on a gray background"

The page is taken once it has rendered (the Draw tab's prompt box, button and gallery exist); with --prompt the
caption is typed into the Draw tab and submitted first, and the screenshot waits for the request's images.
Chromium is driven through playwright (the ``dev`` extra) over the system's Chromium: nothing is downloaded
(no ``playwright install``). Needs ``chromium`` on PATH (Debian: apt-get install chromium).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from typing import Iterator

PROMPT_BOX = "#draw-prompt textarea"
DRAW_BUTTON = "button#draw-button, #draw-button button"  # the id sits on the button or on its wrapper
READY = [PROMPT_BOX, "#draw-button", "#gallery"]  # all exist once the app's page has rendered
GALLERY_IMAGE = "#gallery img"


class BrowserError(RuntimeError):
    """The browser could not start, load the page or run a script in it."""


@contextlib.contextmanager
def open_page(width: int = 1280, height: int = 900, binary: str = "chromium") -> Iterator:
    """A playwright ``Page`` of headless system Chromium with a ``width`` x ``height`` viewport (CSS pixels)."""
    path = shutil.which(binary)
    if path is None:
        raise FileNotFoundError(f"no '{binary}' on PATH: install Chromium (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        raise BrowserError("no playwright: pip install playwright (the browser is the system's Chromium)") from None
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu",
                                                                     "--disable-dev-shm-usage"])
        except Error as e:
            raise BrowserError(f"cannot start {path}: {first_line(e)}") from None
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def first_line(error: Exception) -> str:
    """Playwright's messages go on with a call log; the first line says what failed."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load(page, url: str, timeout: float) -> None:
    """Open ``url`` and wait until the app's page has rendered."""
    from playwright.sync_api import Error

    try:
        page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
    except Error as e:
        raise BrowserError(f"cannot load {url}: {first_line(e)}") from None
    present = " && ".join(f"document.querySelector({json.dumps(selector)}) !== null" for selector in READY)
    wait_for(page, present, timeout, "the app's page to render")


def wait_for(page, expression: str, timeout: float, what: str = ""):
    """Poll a JavaScript expression until it is truthy; its value, or TimeoutError after ``timeout`` s."""
    from playwright.sync_api import Error, TimeoutError as PlaywrightTimeout

    try:
        return page.wait_for_function(expression, timeout=timeout * 1000, polling=250).json_value()
    except PlaywrightTimeout:
        raise TimeoutError(f"waited {timeout:g} s for {what or expression}") from None
    except Error as e:
        raise BrowserError(f"page script failed: {first_line(e)}") from None


def submit_prompt(page, prompt: str) -> None:
    """Type ``prompt`` into the Draw tab and press Draw, as a user would (input events reach the page's state)."""
    page.fill(PROMPT_BOX, prompt)
    page.locator(DRAW_BUTTON).first.click()


def count_gallery_images(page) -> int:
    return page.locator(GALLERY_IMAGE).count()


def screenshot_app(url: str, out: str, prompt: str | None = None, timeout: float = 120, width: int = 1280,
                   height: int = 900) -> None:
    """Load the app at ``url``, optionally draw ``prompt``, and save the page as a PNG at ``out``: the whole
    scrollable page, as wide as the window (headless Chromium draws no scrollbar to narrow it)."""
    with open_page(width, height) as page:
        load(page, url, timeout)
        if prompt:
            submit_prompt(page, prompt)
            wait_for(page, f"document.querySelectorAll({json.dumps(GALLERY_IMAGE)}).length > 0", timeout,
                     "an image in the gallery")
            # Let the remaining images of the request arrive; the gallery grows as each is decoded.
            # Gradio's progress elements change names between versions; the app's own progress text does not
            wait_for(page, "!document.querySelector('.progress-text, .eta-bar') && "
                     "!document.body.innerText.includes('drawing image')", timeout, "the request to finish")
        wait_for(page, "[...document.images].every(i => i.complete)", timeout, "the page's images to load")
        page.screenshot(path=out, full_page=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860", help="where the app serves (default %(default)s)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--prompt", default=None, help="draw this caption first, so the screenshot shows images")
    p.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)")
    p.add_argument("--height", type=int, default=900, help="viewport height (default 900; the page is captured whole)")
    p.add_argument("--timeout", type=float, default=120,
                   help="seconds to wait for the page and the images (default 120)")
    args = p.parse_args(argv)
    errors: tuple = (FileNotFoundError, RuntimeError, TimeoutError, OSError)
    with contextlib.suppress(ImportError):
        from playwright.sync_api import Error

        errors += (Error,)  # a page action that failed (its message goes on with a call log)
    try:
        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        screenshot_app(args.url, args.out, args.prompt, args.timeout, args.width, args.height)
    except errors as e:
        print(f"error: {' '.join(first_line(e).split())}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
