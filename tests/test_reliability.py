"""Reliability of the training entry points: crash-safe checkpoints, broken data, non-finite losses, safe loading.

Most runs call the real scripts in this process (``run_script``: the ``__main__`` block, exit code and stderr
included) as a single rank; the crash test SIGKILLs real ``deepspeed`` launcher process groups.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter

# DeepSpeed's logger keeps the stdout it finds when first imported: import it now, under pytest's session-wide
# capture, not inside a test whose capfd stream is closed when the test ends.
import deepspeed
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import reference_argv
from tests.helpers import (deepspeed_cmd, error_line, launcher_env, log_lines, plain_env, run_script, write_images,
                           write_tiny_assets, write_vqrae)
from vqrae.runtime.checkpoint import Checkpointer
from vqrae.runtime.config import TrainingError
from vqrae.runtime.distributed import cpu_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tokenizer", "tiny_stage1.yaml")
# Fast tiny runs: no LPIPS (the random VGG trunk dominates a CPU step), no TensorBoard, a step per micro-batch.
FAST = ["loss.perceptual_weight=0", "run.tensorboard=false", "run.image_every=0", "run.batch_size=4",
        "run.micro_batch_size=4", "run.log_every=1"]


# ----------------------------------------------------------------------------- helpers


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    write_images(str(folder / "train"), 16)
    return str(folder)


# ----------------------------------------------------------------------------- numerics


class LossSpy:
    """``generator_loss`` whose chosen calls return a non-finite total; records the trained weights (generator
    and discriminator) and the generator's optimizer step count that each call sees (the updates of all
    earlier calls)."""

    def __init__(self, real, bad_calls, engines: list):
        self.real, self.bad_calls, self.engines = real, bad_calls, engines
        self.seen: list[tuple[dict, int]] = []

    def __call__(self, *args, **kwargs):
        call = len(self.seen)
        weights = {f"{i}.{n}": p for i, e in enumerate(self.engines) for n, p in trainable(e.module).items()}
        self.seen.append((weights, self.engines[0].global_steps))
        out = self.real(*args, **kwargs)
        if call in self.bad_calls:
            out = dataclasses.replace(out, total=out.total * float("nan"))
        return out


@pytest.fixture
def loss_spy(monkeypatch):
    """Patch the loss ``vqrae.train`` computes and catch the engines (generator first, then discriminator)."""
    import vqrae.train

    engines: list = []
    real_initialize = deepspeed.initialize

    def initialize(*args, **kwargs):
        out = real_initialize(*args, **kwargs)
        engines.append(out[0])
        return out

    monkeypatch.setattr(deepspeed, "initialize", initialize)

    def install(bad_calls) -> LossSpy:
        spy = LossSpy(vqrae.train.generator_loss, bad_calls, engines)
        monkeypatch.setattr(vqrae.train, "generator_loss", spy)
        return spy

    return install


def test_nonfinite_steps_are_skipped_counted_and_logged(single_rank, images, tmp_path, loss_spy, caplog, capfd):
    from vqrae.runtime.optim import guarded_optimizer

    caplog.set_level(logging.INFO, logger="vqrae")
    out = str(tmp_path / "run")
    # call i computes the loss of step i + 1; steps 4 and 5 are non-finite (the warmup schedule gives steps 1 and 2
    # a learning rate of 0: they would move nothing anyway)
    spy = loss_spy({3, 4})
    code = run_script("train_tokenizer.py", ["--config", TINY, f"data.source={images}", f"run.output_dir={out}",
                                             *FAST, "run.steps=7", "run.save_every=3", "run.max_nonfinite=3"])
    assert code == 0, capfd.readouterr().err
    assert len(spy.seen) == 7
    weights = [w for w, _ in spy.seen]
    assert [s for _, s in spy.seen] == [0, 1, 2, 3, 4, 5, 6]  # a skipped step still counts as a step ...
    assert len(weights[0]) > len(trainable(spy.engines[0].module))  # the discriminator's weights are watched too
    assert not same(weights[2], weights[3])  # a finite loss moves the weights ...
    assert same(weights[3], weights[4]) and same(weights[4], weights[5])  # ... a non-finite one moves nothing,
    assert not same(weights[5], weights[6])  # discriminator included, and training goes on
    steps = {float(st["step"]) for st in guarded_optimizer(spy.engines[0]).state.values()}
    assert steps == {5.0}  # ... but not as an optimizer step: AdamW's moments and step count stay put
    log = log_lines(caplog)
    skipped = [line for line in log if "non-finite loss skipped" in line]
    assert skipped == ["step 4: non-finite loss skipped (1 so far)", "step 5: non-finite loss skipped (2 so far)"]
    assert "nonfinite_steps=2" in [line for line in log if line.startswith("step 6 ")][0]
    assert any(line.endswith("non-finite steps skipped: 2") for line in log)
    state = torch.load(os.path.join(out, "checkpoints", "step_00000006", "trainer.pt"), weights_only=True)
    assert state["step"] == 6 and state["nonfinite"] == 2


def test_nonfinite_losses_in_a_row_stop_the_run_at_the_last_checkpoint(single_rank, images, tmp_path, loss_spy, capfd):
    out = str(tmp_path / "run")
    # steps 1-4 train (checkpoints at 2 and 4), then every loss is NaN: the checkpoint due at 6 waits, and the read
    # at step 7's log stops the run
    spy = loss_spy(set(range(4, 100)))
    code = run_script("train_tokenizer.py", ["--config", TINY, f"data.source={images}", f"run.output_dir={out}",
                                             *FAST, "run.steps=8", "run.save_every=2", "run.max_nonfinite=3",
                                             "run.ema_decay=0"])
    last = os.path.join(out, "checkpoints", "step_00000004")
    assert code == 2
    assert error_line(capfd.readouterr().err) == (
        f"error: 3 non-finite losses in a row at step 7; last good checkpoint: {last}")
    assert len(spy.seen) == 7
    # the weights the run stopped with are those of the last good checkpoint (no EMA: it holds the raw weights)
    saved = load_file(os.path.join(last, "model", "model.safetensors"))
    generator = {k[len("0."):]: v for k, v in spy.seen[-1][0].items() if k.startswith("0.")}
    assert same(generator, {k: saved[k] for k in generator})
    assert Checkpointer(out, 2, 0).resolve("auto") == last


# ----------------------------------------------------------------------------- failed checkpoint write


def test_failed_checkpoint_write_keeps_the_previous_one_and_resume_reproduces(single_rank, reference_run,
                                                                               reference_images, tmp_path,
                                                                               monkeypatch, caplog, capfd):
    caplog.set_level(logging.INFO, logger="vqrae")
    ref, out = reference_run(), str(tmp_path / "run")
    argv = reference_argv(reference_images, out)

    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):  # the step-4 checkpoint runs out of space half-way
        if ".tmp-step_00000004" in str(path) and str(path).endswith("trainer.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    capfd.readouterr()
    assert run_script("train_tokenizer.py", argv) == 2
    previous = os.path.join(out, "checkpoints", "step_00000002")
    assert error_line(capfd.readouterr().err) == (
        f"error: writing the step 4 checkpoint failed ([Errno 28] No space left on device: "
        f"'{out}/checkpoints/.tmp-step_00000004/trainer.pt'); last complete checkpoint: {previous}")
    ckpt = Checkpointer(out, 2, 0)
    assert ckpt.complete() == [previous]
    partial = os.path.join(out, "checkpoints", ".tmp-step_00000004")
    assert not os.path.exists(partial)  # removed by the failed save: nothing partial stays on a full disk

    monkeypatch.setattr(torch, "save", real_save)
    caplog.clear()
    assert run_script("train_tokenizer.py", [*argv, "--resume", "auto"]) == 0
    assert any(f"resumed from step 2 on 1 ranks (checkpoint written by 1): {previous}" in line for line in log_lines(caplog))
    assert not os.path.exists(partial)
    for name in ("model/model.safetensors", "ema.safetensors"):
        a = load_file(os.path.join(ref, "checkpoints", "step_00000004", name))
        b = load_file(os.path.join(out, "checkpoints", "step_00000004", name))
        assert same(a, b), name


def test_resume_auto_skips_unfinished_and_damaged_checkpoints(tmp_path):
    ck = Checkpointer(str(tmp_path), keep_last=5, rank=0)
    for step in (2, 4, 6):
        tmp = ck.tmp_dir(step)
        os.makedirs(os.path.join(tmp, "model"))
        with open(os.path.join(tmp, "model", "w.bin"), "w") as f:
            f.write("x")
        ck.commit(tmp, step)
    root = os.path.join(str(tmp_path), "checkpoints")
    good = os.path.join(root, "step_00000004")
    os.remove(os.path.join(root, "step_00000006", "model", "w.bin"))  # a file its manifest lists is gone
    os.makedirs(os.path.join(root, ".tmp-step_00000008", "model"))  # killed while writing
    os.makedirs(os.path.join(root, "step_00000010"))  # a folder without a manifest
    os.makedirs(os.path.join(root, "step_00000012"))
    with open(os.path.join(root, "step_00000012", "manifest.json"), "w") as f:
        f.write('{"step": 12, "fi')  # a torn manifest
    assert ck.resolve("auto") == good
    assert [os.path.basename(p) for p in ck.complete()] == ["step_00000002", "step_00000004"]
    for bad in ("step_00000006", ".tmp-step_00000008", "step_00000010", "step_00000012"):
        with pytest.raises(TrainingError, match="not a complete checkpoint"):
            ck.resolve(os.path.join(root, bad))
    assert ck.resolve(good) == good


# ----------------------------------------------------------------------------- crash safety (real launcher)


def launch(argv: list[str]) -> subprocess.Popen:
    """``deepspeed --num_gpus 1 scripts/train_tokenizer.py argv`` in its own process group, log on stdout."""
    cmd = deepspeed_cmd(1, "scripts/train_tokenizer.py", *argv)
    return subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


class KillAtStep(threading.Thread):
    """Reads a launched run's log and SIGKILLs its whole process group (launcher and rank) once the log
    reports ``step``; runs beside the test so the test can do other work meanwhile."""

    def __init__(self, proc: subprocess.Popen, step: int):
        super().__init__(daemon=True)
        self.proc, self.step, self.lines = proc, step, []
        self.start()

    def run(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if re.search(rf"\bstep {self.step} loss/", line):
                os.killpg(self.proc.pid, signal.SIGKILL)
                break

    def log(self, timeout: float = 300) -> str:
        self.join(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.join(30)
        text = "".join(self.lines)
        assert re.search(rf"\bstep {self.step} loss/", text), f"never reached step {self.step}:\n{text[-3000:]}"
        return text


def group_gone(pgid: int) -> bool:
    for _ in range(50):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def launched_rank_threads():
    """This process computes with the threads a launched lone rank takes (OMP_NUM_THREADS where set, as
    tests/conftest.py sets it under pytest-xdist, else ``cpu_threads(1)``): runs compared bit for bit with launched
    ones must sum their floats alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or cpu_threads(1)))
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_equals_an_uninterrupted_run(single_rank, images, tmp_path, caplog,
                                                                        launched_rank_threads):
    steps, every = 10, 2
    argv = ["--config", TINY, f"data.source={images}", *FAST, f"run.steps={steps}", f"run.save_every={every}",
            "run.keep_last=2"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    rng = random.Random()
    first = rng.randint(2, 6)  # the first kill lands anywhere from just after a checkpoint to well past one
    run = launch([*argv, f"run.output_dir={out}"])
    killer = KillAtStep(run, first)
    # the uninterrupted run, in this process while the launcher starts up (the same code as one launched rank)
    assert run_script("train_tokenizer.py", [*argv, f"run.output_dir={ref}"]) == 0
    assert "done:" not in killer.log()
    assert group_gone(run.pid), "a rank outlived the SIGKILL of its process group"
    resumed_from = Checkpointer(out, 2, 0).resolve("auto")  # none when the kill came during the first save
    # leftovers of a crash during a save, and a folder that only looks like a checkpoint: never resumed from
    root = os.path.join(out, "checkpoints")
    os.makedirs(os.path.join(root, ".tmp-step_00000099", "generator"), exist_ok=True)
    os.makedirs(os.path.join(root, "step_00000098", "generator"), exist_ok=True)

    start = int(resumed_from[-8:]) if resumed_from else 0
    second = rng.randint(max(first, start) + 1, steps - 1)
    run = launch([*argv, f"run.output_dir={out}", "--resume", "auto"])
    log = KillAtStep(run, second).log()
    assert "done:" not in log
    assert (f"resumed from step {start} on 1 ranks (checkpoint written by 1): {resumed_from}" in log) if resumed_from else "resumed" not in log
    assert group_gone(run.pid)

    # the last stretch in this process: a launched rank runs this same code, and it saves a launcher start
    caplog.set_level(logging.INFO, logger="vqrae")
    caplog.clear()
    assert run_script("train_tokenizer.py", [*argv, f"run.output_dir={out}", "--resume", "auto"]) == 0
    assert f"done: {steps} steps; model exported to {out}/model" in log_lines(caplog)
    trials = f"killed at steps {first} and {second}"
    for name in ("model/model.safetensors", "ema.safetensors"):
        a = load_file(os.path.join(ref, "checkpoints", f"step_{steps:08d}", name))
        b = load_file(os.path.join(root, f"step_{steps:08d}", name))
        assert same(a, b), f"{name} differs from the uninterrupted run ({trials})"
    assert same(load_file(os.path.join(ref, "model", "model.safetensors")),
                load_file(os.path.join(out, "model", "model.safetensors"))), trials
    assert not os.path.exists(os.path.join(root, "step_00000098", "manifest.json"))


# ----------------------------------------------------------------------------- bad data


def _png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side pixels in a few tens of KB: its header alone must get it refused."""
    rows = b"\0" * ((side // 8 + 1) * side)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")


def _scramble_idat(png: bytes, rng: np.random.Generator) -> bytes:
    """Valid chunks and CRCs around a compressed stream that does not decode."""
    start = png.index(b"IDAT") - 4
    n = struct.unpack(">I", png[start : start + 4])[0]
    data = png[start + 8 : start + 8 + n]
    data = data[:2] + rng.integers(0, 256, n - 2, dtype=np.uint8).tobytes()  # keep the zlib header
    return png[:start] + _chunk(b"IDAT", data) + png[start + 12 + n :]


def write_odd_images(folder: str, seed: int = 0) -> dict[str, str]:
    """Broken and unusual image files next to good ones; returns file name -> the status training must count."""
    rng = np.random.default_rng(seed)

    def pixels(h, w, c=3):
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    good_png, good_jpg = _png(Image.fromarray(pixels(40, 40))), _jpeg(Image.fromarray(pixels(40, 40)))
    big = np.kron(pixels(30, 20), np.ones((100, 100, 1), dtype=np.uint8))  # 3000 x 2000, decoded at a reduced size
    files = {
        "truncated.png": (good_png[: len(good_png) // 2], "truncated"),
        "truncated.jpg": (good_jpg[: len(good_jpg) // 2], "truncated"),
        "zero_bytes.png": (b"", "empty"),
        "text.png": (b"not an image at all\n" * 4, "not_an_image"),
        "bad_stream.png": (_scramble_idat(good_png, rng), "corrupt"),
        "gray.png": (_png(Image.fromarray(pixels(40, 40, 1)[..., 0], "L")), "converted_L"),
        "rgba.png": (_png(Image.fromarray(pixels(40, 40, 4), "RGBA")), "converted_RGBA"),
        "palette.png": (_png(Image.fromarray(pixels(40, 40)).convert("P"), transparency=0), "converted_P"),
        "cmyk.jpg": (_jpeg(Image.fromarray(pixels(40, 40)).convert("CMYK")), "converted_CMYK"),
        "sixteen_bit.png": (_png(Image.fromarray(pixels(40, 40, 1)[..., 0].astype(np.uint16) * 257)), "converted_I;16"),
        "one_pixel.png": (_png(Image.fromarray(pixels(1, 1))), "too_small"),
        "bomb.png": (_bomb_png(20000), "too_large"),
        "big.jpg": (_jpeg(Image.fromarray(big)), "ok"),
    }
    os.makedirs(folder, exist_ok=True)
    for name, (data, _) in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return {name: status for name, (_, status) in files.items()}


def data_summary(log: list[str]) -> dict:
    line = [line for line in log if line.startswith("data: ")]
    assert len(line) == 1, log
    return ast.literal_eval(line[0][len("data: ") : line[0].index("; non-finite")])


def test_training_survives_broken_and_odd_images_and_reports_them(single_rank, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vqrae")
    folder = str(tmp_path / "data" / "train")
    expected = write_odd_images(folder)
    write_images(folder, 27, seed=1)
    rows = len(os.listdir(folder))
    assert rows == 40 and sum(s != "ok" for s in expected.values()) / rows >= 0.1
    out = str(tmp_path / "run")
    # one epoch exactly: 10 micro-batches of 4, every row drawn once
    code = run_script("train_tokenizer.py", ["--config", TINY, f"data.source={tmp_path / 'data'}",
                                             f"run.output_dir={out}", *FAST, "run.steps=10", "run.save_every=10"])
    assert code == 0
    log = log_lines(caplog)
    assert any(line.startswith("done: 10 steps") for line in log)
    assert data_summary(log) == dict(Counter(s for s in expected.values() if s != "ok"))
    skipped = sum(1 for s in expected.values() if s != "ok" and not s.startswith("converted"))
    assert "data/skipped=%d " % skipped in [line for line in log if line.startswith("step 10 ")][0]
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))


@pytest.mark.parametrize("stage", [1, 2])
def test_a_source_without_one_readable_image_stops_with_one_line(single_rank, tmp_path, capfd, stage):
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    for i in range(8):
        (folder / f"{i}.png").write_bytes(b"")
    argv = ["--config", TINY, f"data.source={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'run'}", *FAST]
    if stage == 2:  # no calibration pass before the loop: the loop itself must notice
        argv += ["stage=2", f"init_from={write_vqrae(str(tmp_path / 'stage1'))}"]
    assert run_script("train_tokenizer.py", argv) == 2
    line = error_line(capfd.readouterr().err)
    assert line.startswith(f"error: data.source '{tmp_path / 'data'}': ") and "readable image" in line, line
    if stage == 2:
        assert line.endswith("2 micro-batches in a row without a readable image; row statuses so far: {'empty': 8}")


def write_mllm_rows(root: str) -> tuple[str, str, dict, dict]:
    """An image-caption folder and a LLaVA conversation file, each 16 rows of which 5 are unusable; returns
    their paths and the statuses one epoch of each must count (besides "ok")."""
    images = os.path.join(root, "captions", "train")
    write_images(images, 16, size=32, seed=2)
    captions = ["a red circle on a blue background"] * 11 + ["", "   ", None, "a green star", "a blue square"]
    with open(os.path.join(images, "015.png"), "wb"):
        pass  # zero bytes
    with open(os.path.join(images, "014.png"), "wb") as f:
        f.write(b"plain text, not a PNG")
    with open(os.path.join(images, "metadata.jsonl"), "w") as f:
        for i, caption in enumerate(captions):
            f.write(json.dumps({"file_name": f"{i:03d}.png", "caption": caption}) + "\n")

    def turns(question: str, answer: str | None = "red") -> list[dict]:
        return [{"from": "human", "value": question}] + ([{"from": "gpt", "value": answer}] if answer else [])

    rows = [{"image": f"captions/train/{i:03d}.png", "conversations": turns("<image>\nWhat colour is the shape?")}
            for i in range(11)]
    rows += [
        {"conversations": turns("What colour is the sky?", "blue")},  # text only: no image to look at
        {"image": "captions/train/missing.png", "conversations": turns("What shape is it?")},
        {"image": "captions/train/000.png", "conversations": []},
        {"image": "captions/train/001.png", "conversations": turns("What shape is it?", None)},  # no answer
        {"image": "captions/train/015.png", "conversations": turns("What shape is it?")},
    ]
    conversations = os.path.join(root, "llava.json")
    with open(conversations, "w") as f:
        json.dump(rows, f)
    generation = {"missing_caption": 3, "empty": 1, "not_an_image": 1}
    understanding = {"missing": 2, "missing_conversations": 1, "bad_conversation": 1, "empty": 1}
    return os.path.dirname(images), conversations, generation, understanding


def test_unified_training_skips_rows_without_captions_images_or_answers(single_rank, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vqrae")
    assets = write_tiny_assets(str(tmp_path / "assets"), num_train=4)
    captions, conversations, generation, understanding = write_mllm_rows(str(tmp_path))
    # 16 micro-batches of 2 rows at ratio 0.5: one epoch of each source
    code = run_script("train_mllm.py", [
        "--config", os.path.join(ROOT, "configs", "mllm", "tiny.yaml"), f"model.llm={assets['llm']}",
        f"model.vqrae={assets['vqrae']}", f"data.generation.source={captions}",
        f"data.understanding.source={conversations}", "data.understanding.conversation_column=conversations",
        f"run.output_dir={tmp_path / 'run'}", "run.steps=16", "run.batch_size=2", "run.save_every=16",
        "run.log_every=16", "run.tensorboard=false"])
    assert code == 0
    log = log_lines(caplog)
    assert any(line.startswith("done: 16 steps") for line in log), log
    summary = [line for line in log if line.startswith("data on rank 0: ")]
    assert len(summary) == 1
    counts = ast.literal_eval(summary[0][len("data on rank 0: ") : summary[0].index("; non-finite")])
    want = Counter(generation) + Counter(understanding)
    assert counts == dict(want)
    assert "data/skipped=%d " % sum(want.values()) in [line for line in log if line.startswith("step 16 ")][0]


# ----------------------------------------------------------------------------- safe loading

PACKAGES = ("vqrae", "mllm", "demo", "scripts", "bench")


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """Calls that can run code from a file or a hub repo: ``torch.load`` without ``weights_only=True``, any
    ``trust_remote_code=True`` literal, ``pickle.load(s)``, ``yaml.load`` / ``yaml.unsafe_load`` and
    ``np.load(..., allow_pickle=True)``."""
    found = []

    def const_true(node) -> bool:
        return isinstance(node, ast.Constant) and node.value is True

    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}"
        if name == "load" and owner == "torch" and not const_true(kw.get("weights_only")):
            found.append(f"{where} torch.load without weights_only=True")
        if const_true(kw.get("trust_remote_code")):
            found.append(f"{where} trust_remote_code=True")
        if owner == "pickle" and name in ("load", "loads"):
            found.append(f"{where} pickle.{name}")
        if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
            found.append(f"{where} yaml.{name}")
        if owner in ("np", "numpy") and name == "load" and const_true(kw.get("allow_pickle")):
            found.append(f"{where} np.load(allow_pickle=True)")
    return found


def test_the_scanner_finds_unsafe_calls():
    bad = ("import torch, pickle, yaml\nx = torch.load(p)\ny = torch.load(p, weights_only=False)\n"
           "m = AutoModel.from_pretrained(p, trust_remote_code=True)\nz = pickle.loads(b)\nc = yaml.load(f)\n"
           "a = np.load(p, allow_pickle=True)\nok = torch.load(p, map_location='cpu', weights_only=True)\n")
    assert [f.split(" ", 1)[1] for f in unsafe_calls(bad)] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True", "trust_remote_code=True",
        "pickle.loads", "yaml.load", "np.load(allow_pickle=True)"]


def test_no_unsafe_loading_in_the_package_and_scripts():
    found, torch_loads = [], 0
    for top in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    source = f.read()
                torch_loads += source.count("torch.load(")
                found += unsafe_calls(source, os.path.relpath(path, ROOT))
    assert torch_loads >= 4  # the trainers' resume and the LPIPS/FID weights: the scan does see them
    assert found == []
    configs = os.path.join(ROOT, "configs")
    for folder, _, files in os.walk(configs):
        for name in files:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                assert not re.search(r"trust_remote_code\W+true", f.read(), re.IGNORECASE), name


@pytest.fixture(scope="module")
def fresh_rank(tmp_path_factory) -> dict:
    """A fresh interpreter, pinned to one core (as taskset or a cgroup would), that sets up its lone rank the way
    the trainers do: what it reports, and its own DeepSpeed extension folder."""
    ext = tmp_path_factory.mktemp("ext")
    code = (
        "import os, torch, deepspeed, deepspeed.comm.comm as comm\n"
        "from vqrae.runtime.distributed import init_distributed\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "before = dict(deepspeed.ops.__compatible_ops__)\n"
        "rank, world, _ = init_distributed()\n"
        "print(rank, world, comm.cdb.shm_comm_op is None, dict(deepspeed.ops.__compatible_ops__) == before, "
        "torch.get_num_threads())\n"
    )
    env = {k: v for k, v in plain_env().items() if k != "OMP_NUM_THREADS"}
    env.update(TORCH_EXTENSIONS_DIR=str(ext), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": proc.stdout.strip().splitlines()[-1].split(), "ext": ext}


def test_cpu_training_builds_no_shared_memory_op(fresh_rank):
    """Training never calls DeepSpeed's CPU shared-memory all-reduce: init_distributed compiles nothing (on a fresh
    machine that op took ~30 s of every first run) and leaves DeepSpeed's op table as it found it."""
    assert fresh_rank["out"][:4] == ["0", "1", "True", "True"], fresh_rank["out"]
    assert not any(fresh_rank["ext"].iterdir())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2+ cores")
def test_cpu_rank_uses_only_the_cores_it_may_run_on(fresh_rank):
    """A process pinned to one core (taskset, a cgroup) runs one thread, not one per core of the machine: two demo
    experiments pinned side by side would otherwise each oversubscribe their core."""
    assert fresh_rank["out"][4] == "1", fresh_rank["out"]
