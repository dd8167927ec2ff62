"""Save a screenshot of the running web app (scripts/app.py) with headless Chromium.

    python scripts/app.py --model outputs/demo/mllm/model &
    python scripts/screenshot_app.py --url http://127.0.0.1:7860 --out docs/app.png
    python scripts/screenshot_app.py --url http://127.0.0.1:7860 --out docs/app_draw.png \\
        --prompt "a small blue star at the top left on a gray background"

The page is taken once it has rendered (the Draw tab's prompt box, button and gallery exist); with --prompt the
caption is typed into the Draw tab and submitted first, and the screenshot waits for the request's images.
Chromium is driven through its DevTools protocol over a pipe (``--remote-debugging-pipe``): no extra Python
package and no debugging port. Needs ``chromium`` on PATH (Debian: apt-get install chromium).
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

PROMPT_BOX = "#draw-prompt textarea"
READY = [PROMPT_BOX, "#draw-button", "#gallery"]  # all exist once the app's page has rendered
GALLERY_IMAGE = "#gallery img"


class Browser:
    """One headless Chromium page driven over the DevTools protocol; use as a context manager.

    Args:
        binary: the Chromium executable.
        width, height: viewport in CSS pixels.
        timeout: seconds one protocol command may take.
    """

    def __init__(self, binary: str = "chromium", width: int = 1280, height: int = 900, timeout: float = 30) -> None:
        path = shutil.which(binary)
        if path is None:
            raise FileNotFoundError(f"no '{binary}' on PATH: install Chromium (Debian: apt-get install chromium)")
        self.timeout, self.width = timeout, width
        self.profile = tempfile.mkdtemp(prefix="vqrae-chromium-")
        to_browser_r, self._out = os.pipe()
        self._in, from_browser_w = os.pipe()

        def pipe_fds():  # in the child: Chromium reads commands from fd 3 and writes replies to fd 4
            r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        args = [path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        self.log = open(os.path.join(self.profile, "chromium.log"), "w")
        # close_fds=False: only fds 3 and 4 are inheritable (os.pipe's own ends are not), so only they pass exec.
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=pipe_fds, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf, self._id = b"", 0
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, page=True)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, method: str, params: dict | None = None, page: bool = False, timeout: float | None = None) -> dict:
        """Run one protocol command (on the page's session when ``page``); its result, or RuntimeError."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._out, data):]
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._id:  # anything else is an event or an older reply
                if "error" in reply:
                    raise RuntimeError(f"chromium: {method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})

    def _read(self, deadline: float, method: str) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer {method} in time")
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (log: {self.log.name})")
                self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return json.loads(message)

    def open(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url}, page=True)
        if result.get("errorText"):
            raise RuntimeError(f"cannot load {url}: {result['errorText']}")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                           page=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            error = details.get("exception", {}).get("description", details.get("text"))
            raise RuntimeError(f"page script failed: {error}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str = ""):
        """Poll a JavaScript expression until it is truthy; its value, or TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:g} s for {what or expression}")
            time.sleep(0.25)

    def screenshot(self, path: str, full_page: bool = True) -> None:
        """A PNG of the page: the whole scrollable page, or the viewport; as wide as the window either way (a page
        taller than the window has a scrollbar, which narrows its content)."""
        params = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics", page=True)["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": max(size["width"], self.width),
                                                            "height": size["height"], "scale": 1})
        data = self.send("Page.captureScreenshot", params, page=True)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=5)
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for fd in (self._in, self._out):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def wait_until_rendered(browser: Browser, timeout: float) -> None:
    present = " && ".join(f"document.querySelector({json.dumps(selector)}) !== null" for selector in READY)
    browser.wait_for(present, timeout, "the app's page to render")


def submit_prompt(browser: Browser, prompt: str) -> None:
    """Type ``prompt`` into the Draw tab and press Draw, as a user would (input events reach the page's state)."""
    browser.evaluate(f"""(() => {{
        const box = document.querySelector({json.dumps(PROMPT_BOX)});
        const set = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;
        set.call(box, {json.dumps(prompt)});
        box.dispatchEvent(new Event('input', {{bubbles: true}}));
        const button = document.querySelector('#draw-button');
        (button.tagName === 'BUTTON' ? button : button.querySelector('button')).click();
        return true;
    }})()""")


def count_gallery_images(browser: Browser) -> int:
    return browser.evaluate(f"document.querySelectorAll({json.dumps(GALLERY_IMAGE)}).length")


def screenshot_app(url: str, out: str, prompt: str | None = None, timeout: float = 120, width: int = 1280,
                   height: int = 900) -> None:
    """Load the app at ``url``, optionally draw ``prompt``, and save the page as a PNG at ``out``."""
    with Browser(width=width, height=height) as browser:
        browser.open(url)
        wait_until_rendered(browser, timeout)
        if prompt:
            submit_prompt(browser, prompt)
            browser.wait_for(f"document.querySelectorAll({json.dumps(GALLERY_IMAGE)}).length > 0", timeout,
                             "an image in the gallery")
            # Let the remaining images of the request arrive; the gallery grows as each is decoded.
            # Gradio's progress elements change names between versions; the app's own progress text does not
            browser.wait_for("!document.querySelector('.progress-text, .eta-bar') && "
                             "!document.body.innerText.includes('drawing image')", timeout, "the request to finish")
        browser.wait_for("[...document.images].every(i => i.complete)", timeout, "the page's images to load")
        browser.screenshot(out)


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
    try:
        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        screenshot_app(args.url, args.out, args.prompt, args.timeout, args.width, args.height)
    except (FileNotFoundError, RuntimeError, TimeoutError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
