"""scripts/app.py served for real on a free local port: driven through gradio_client, and through headless Chromium
when it is installed."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from mllm.chat import chat_answer, read_chat_image, start_conversation  # noqa: E402
from mllm.inference import generate_images, load_model, to_uint8  # noqa: E402
from mllm.sampling import SamplingConfig  # noqa: E402
from tests.helpers import free_port, write_answering_model  # noqa: E402
from demo.shapes import write_imagefolder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # --max-new-tokens of the served app
START_TIMEOUT = 300  # seconds for the app to load the model and serve (a busy 2-core CI machine)


def wait_until_serving(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the app did not serve {url} within {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    model_dir = write_answering_model(root, seed=1, distinct_codes=True)
    write_imagefolder(str(root / "shapes"), 4, 2, seed=0, size=32)
    url = f"http://127.0.0.1:{free_port()}"
    log = root / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONWARNINGS="ignore")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "app.py"), "--model", model_dir, "--host", "127.0.0.1",
             "--port", url.rsplit(":", 1)[1], "--examples", str(root / "shapes" / "test"),
             "--max-new-tokens", str(STEPS)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_until_serving(url, proc, log, START_TIMEOUT)
        yield {"url": url, "model": model_dir, "images": sorted((root / "shapes" / "test").glob("*.png")),
               "root": root, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def client(app):
    return Client(app["url"], verbose=False)


@pytest.fixture(scope="module")
def model(app):
    return load_model(app["model"])


def draw(client, prompt="a small red circle", negative="", n=2, guidance=2.0, temperature=1.0, top_k=0, top_p=1.0,
         seed=7, random_seed=False, decoding="autoregressive"):
    return client.predict(prompt, negative, n, guidance, temperature, top_k, top_p, seed, random_seed, decoding,
                          api_name="/draw")


def png_pixels(path) -> torch.Tensor:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


def text(message) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def test_draw_returns_the_seeded_images_as_pngs(client, model):
    gallery, seed = draw(client, negative="blue", n=3, seed=7)
    assert seed == 7 and len(gallery) == 3
    sampling = model.sampling_config(seed=7, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)
    want = to_uint8(generate_images(model, ["a small red circle"], sampling, num_images=3, negative_prompt="blue",
                                    batch_size=1).images)
    for k, item in enumerate(gallery):
        assert re.fullmatch(rf"\d+\.\d\d s · seed 7 #{k + 1}", item["caption"])
        assert torch.equal(png_pixels(item["image"]), want[k])

    gallery, seed = draw(client, n=1, seed=7, random_seed=True)  # the seed box is ignored and the drawn one shown
    assert isinstance(seed, int) and f"seed {seed} #1" in gallery[0]["caption"]

    gallery, _ = draw(client, n=2, seed=7, decoding="jacobi")
    sampling = model.sampling_config(seed=7, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, decoding="jacobi")
    want = to_uint8(generate_images(model, ["a small red circle"], sampling, num_images=2, batch_size=1).images)
    assert all(torch.equal(png_pixels(item["image"]), want[k]) for k, item in enumerate(gallery))


def test_draw_starts_sampling_even_for_a_model_saved_greedy(app, tmp_path):
    spec = importlib.util.spec_from_file_location("app_page", ROOT / "scripts" / "app.py")
    page_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page_module)
    model = load_model(app["model"])
    values = {}
    for saved in (SamplingConfig(temperature=0.0, cfg_scale=1.0), SamplingConfig(temperature=0.7, top_k=4, cfg_scale=1.0)):
        model.cfg.sampling = saved
        page = page_module.build_app(model, STEPS, str(tmp_path))
        props = [c.get("props", {}) for c in page.config["components"]]
        values[saved.temperature] = {p["elem_id"]: p.get("value") for p in props if p.get("elem_id", "").startswith("draw-")}
    assert values[0.0]["draw-temperature"] == 1.0  # one click from greedy, not greedy: n images differ
    assert values[0.7]["draw-temperature"] == 0.7 and values[0.7]["draw-decoding"] == "autoregressive"


def test_two_turns_stream_and_the_second_prompt_holds_the_first(client, model, app):
    image = str(app["images"][0])
    job = client.submit(handle_file(image), "What colour is the shape", [], api_name="/ask")
    history, box, status = job.result(timeout=120)
    updates = job.outputs()
    assert len(updates) > 2  # the answer grew token by token
    partial = [text(u[0][-1]) for u in updates]
    assert all(later.startswith(earlier) for earlier, later in zip(partial, partial[1:]))

    conv = start_conversation(model, read_chat_image(image))
    first = chat_answer(model, conv, "What colour is the shape", max_new_tokens=STEPS)
    assert [m["role"] for m in history] == ["user", "assistant"] and text(history[1]) == first and box == ""
    conv.add("What colour is the shape", first)
    second = chat_answer(model, conv, "Where is the shape", max_new_tokens=STEPS)

    history2, _, status2 = client.predict(handle_file(image), "Where is the shape", history, api_name="/ask")
    assert [text(m) for m in history2] == ["What colour is the shape", first, "Where is the shape", second]
    tokens = [int(re.search(r"prompt (\d+) tokens", s).group(1)) for s in (status, status2)]
    assert status.startswith("turn 1") and status2.startswith("turn 2")
    # The second prompt holds the first question and answer besides the new question.
    assert tokens[1] > tokens[0] + len(model.tokenizer.encode(first, add_special_tokens=False))


def test_bad_input_is_a_message_and_the_app_goes_on(client, app):
    corrupt = app["root"] / "corrupt.png"
    corrupt.write_bytes(b"not an image at all" * 10)
    truncated = app["root"] / "truncated.png"
    truncated.write_bytes(app["images"][0].read_bytes()[:80])
    huge = app["root"] / "huge.png"
    Image.new("L", (5000, 4100)).save(huge)  # 20.5 MP, a few kB on disk
    image = handle_file(str(app["images"][0]))
    ask = lambda path: client.predict(handle_file(str(path)), "What colour", [], api_name="/ask")  # noqa: E731
    cases = [
        (lambda: draw(client, prompt="   "), "prompt is empty"),
        (lambda: draw(client, guidance=50.0), r"greater than maximum value 20|guidance must be between"),
        (lambda: draw(client, top_k=-3), r"top-k|less than minimum"),
        (lambda: draw(client, n=0), r"less than minimum|number of images"),
        (lambda: draw(client, decoding="beam"), r"decoding|not in the list of choices"),
        (lambda: draw(client, prompt="circle " * 600), "tokens but this model takes at most"),
        (lambda: client.predict(image, "  ", [], api_name="/ask"), "question is empty"),
        (lambda: client.predict(None, "What colour is the shape", [], api_name="/ask"), "upload an image"),
        (lambda: ask(corrupt), "cannot use this image"),
        (lambda: ask(truncated), "cannot use this image"),
        (lambda: ask(huge), "more than 20 megapixels"),
    ]
    for call, words in cases:
        with pytest.raises(AppError, match=words) as err:
            call()
        assert "\n" not in str(err.value).strip(), str(err.value)
    gallery, _ = draw(client, n=1)  # still serving
    assert len(gallery) == 1
    history, _, _ = client.predict(image, "What colour is the shape", [], api_name="/ask")
    assert len(history) == 2 and text(history[1])


# ----------------------------------------------------------------------------- a real browser

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None or importlib.util.find_spec("playwright") is None,
                                    reason="no chromium on PATH or no playwright")


@pytest.fixture(scope="module")
def screenshot_tool():
    spec = importlib.util.spec_from_file_location("screenshot_app", ROOT / "scripts" / "screenshot_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_chromium
def test_page_renders_and_a_submitted_prompt_shows_images(app, screenshot_tool, tmp_path):
    tool = screenshot_tool
    with tool.open_page(width=1280, height=900) as page:
        tool.load(page, app["url"], 120)
        assert page.evaluate("document.title") == "VQRAE"
        assert page.evaluate("document.querySelector('#draw-button') !== null")
        assert tool.count_gallery_images(page) == 0
        tool.submit_prompt(page, "a small blue star at the top left")
        decoded = "[...document.querySelectorAll('#gallery img')].some(i => i.complete && i.naturalWidth > 0)"
        tool.wait_for(page, decoded, 180, "a decoded image in the gallery")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.width == 1280
        assert np.array(img.convert("L")).std() > 5  # something was drawn, not a blank page


@needs_chromium
def test_screenshot_tool_saves_the_page(app, tmp_path):
    out = tmp_path / "shots" / "app.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_app.py"), "--url", app["url"],
                           "--out", str(out), "--width", "1024"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width == 1024 and img.height >= 400
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_app.py"), "--url",
                          f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "x.png"), "--timeout", "5"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
