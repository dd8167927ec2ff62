"""Checkpoints never run code from their files, verify themselves, fail in one line; one run per output folder.

Most runs call the real scripts in this process (``run_script``: the ``__main__`` block, exit code and stderr
included) as a single rank, so the imports are paid once; one runs a script as its own process.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time

# DeepSpeed's logger keeps the stdout it finds when first imported: import it now, under pytest's session-wide
# capture, not inside a test whose capfd stream is closed when the test ends.
import deepspeed  # noqa: F401
import pytest
import torch

from tests.conftest import copy_checkpoint, reference_argv
from tests.helpers import plain_env
from tests.helpers import error_line, log_lines, rank_env, run_script, write_tiny_assets
from vqrae.runtime.checkpoint import MANIFEST, Checkpointer, damage
from vqrae.runtime.config import TrainingError
from vqrae.runtime.lock import LOCK, LOCK_STALE_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "configs", "tokenizer", "tiny_stage1.yaml")
MLLM = os.path.join(ROOT, "configs", "mllm", "tiny.yaml")
# Fast tiny runs: no LPIPS, no TensorBoard or image grids, one optimizer step per micro-batch.
FAST = ["loss.perceptual_weight=0", "run.tensorboard=false", "run.image_every=0", "run.batch_size=4",
        "run.micro_batch_size=4", "run.log_every=1", "run.keep_last=5"]
MODEL_STATES = "generator/mp_rank_00_model_states.pt"
OPTIM_STATES = "generator/zero_pp_rank_0_mp_rank_00_optim_states.pt"


# ----------------------------------------------------------------------------- helpers


def blake2b(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read()).hexdigest()


def step_dir(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step_{step:08d}")


class OpensAFile:
    """Unpickling this creates ``path``: proof that a loader ran code taken from the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def plant(ckpt: str, name: str, marker: str) -> str:
    """Replace ``ckpt/name`` by a pickle that creates ``marker`` when unpickled unsafely, and record it in the
    manifest as an attacker would, so the checkpoint still verifies; returns the file's path."""
    path = os.path.join(ckpt, name)
    torch.save({"module": OpensAFile(marker), "optimizer_state_dict": OpensAFile(marker)}, path)
    with open(os.path.join(ckpt, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["files"][name]["size"] > 0  # the record being replaced: size and digest per file
    manifest["files"][name] = {"size": os.path.getsize(path), "blake2b": blake2b(path)}
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump(manifest, f)
    assert damage(ckpt) is None
    return path


def assert_payload_is_live(path: str, marker: str) -> None:
    """The planted file does run code through DeepSpeed's own loader (``weights_only=False``): the runs that
    refused it were really at risk."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    assert not os.path.exists(marker)
    state = TorchCheckpointEngine().load(path, map_location="cpu")
    state["module"].close()
    assert os.path.exists(marker)


def refused(path: str) -> str:
    return f"error: refusing to load {path}: it holds more than tensors and plain data (Unsupported global: GLOBAL io.open)"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return write_tiny_assets(str(tmp_path_factory.mktemp("assets")), num_train=16)


def tokenizer_argv(assets: dict, out: str, *extra: str) -> list[str]:
    return ["--config", TOKENIZER, f"data.source={assets['data']}", f"run.output_dir={out}", *FAST, *extra]


@pytest.fixture
def run_copy(single_rank, reference_run, tmp_path) -> str:
    """A copy of the finished reference run (tests/conftest.py): checkpoints at steps 2 and 4 (ZeRO-1, generator
    and discriminator)."""
    out = str(tmp_path / "run")
    shutil.copytree(reference_run(), out)
    return out


# ----------------------------------------------------------------------------- no foreign code


@pytest.mark.parametrize("name, resume", [(MODEL_STATES, "dir"), (MODEL_STATES, "auto"), (OPTIM_STATES, "dir"),
                                          ("discriminator/mp_rank_00_model_states.pt", "auto"),
                                          ("trainer.pt", "auto")])
def test_a_crafted_pickle_in_a_tokenizer_checkpoint_never_runs(run_copy, reference_images, tmp_path, capfd, name, resume):
    marker = str(tmp_path / "pwned")
    ckpt = step_dir(run_copy, 4)
    path = plant(ckpt, name, marker)
    capfd.readouterr()
    code = run_script("train_tokenizer.py", reference_argv(reference_images, run_copy, "run.steps=6", "run.save_every=2",
                                                           "--resume", ckpt if resume == "dir" else "auto"))
    assert code == 2
    assert error_line(capfd.readouterr().err) == refused(path)
    assert not os.path.exists(marker)
    assert not os.path.exists(os.path.join(run_copy, LOCK))  # released on the error exit too
    assert_payload_is_live(path, marker)


def test_a_crafted_pickle_is_refused_by_the_script_as_its_own_process(run_copy, reference_images, tmp_path):
    marker = str(tmp_path / "pwned")
    ckpt = step_dir(run_copy, 4)
    path = plant(ckpt, MODEL_STATES, marker)
    env = plain_env()
    env.update(rank_env(), TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/vqrae_torch_ext"))
    proc = subprocess.run([sys.executable, "scripts/train_tokenizer.py",
                           *reference_argv(reference_images, run_copy, "run.steps=6", "--resume", ckpt)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc.stderr) == refused(path)
    assert not os.path.exists(marker)
    assert_payload_is_live(path, marker)


def test_a_crafted_pickle_in_an_mllm_checkpoint_never_runs(single_rank, assets, tmp_path, capfd):
    out = str(tmp_path / "mllm")
    argv = ["--config", MLLM, f"model.llm={assets['llm']}", f"model.vqrae={assets['vqrae']}",
            f"data.generation.source={assets['data']}", f"data.understanding.source={assets['data']}",
            f"run.output_dir={out}", "run.batch_size=2", "run.log_every=1", "run.tensorboard=false"]
    assert run_script("train_mllm.py", [*argv, "run.steps=2", "run.save_every=2"]) == 0
    marker = str(tmp_path / "pwned")
    ckpt = step_dir(out, 2)
    path = plant(ckpt, "mllm/mp_rank_00_model_states.pt", marker)
    capfd.readouterr()
    assert run_script("train_mllm.py", [*argv, "run.steps=4", "--resume", ckpt]) == 2
    assert error_line(capfd.readouterr().err) == refused(path)
    assert not os.path.exists(marker)
    assert not os.path.exists(os.path.join(out, LOCK))
    assert_payload_is_live(path, marker)


# ----------------------------------------------------------------------------- self-verifying checkpoints


def truncate(path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 7)
    return f"{MODEL_STATES} has {size - 7} bytes, the manifest says {size}"


def change_a_byte(path: str) -> str:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return f"{MODEL_STATES} does not match its checksum"


def remove(path: str) -> str:
    os.remove(path)
    return f"{MODEL_STATES} is missing"


@pytest.mark.parametrize("harm", [truncate, change_a_byte])
def test_resume_auto_skips_a_damaged_newest_checkpoint(run_copy, reference_images, caplog, capfd, harm):
    caplog.set_level(logging.INFO, logger="vqrae")
    newest, older = step_dir(run_copy, 4), step_dir(run_copy, 2)
    reason = harm(os.path.join(newest, MODEL_STATES))
    code = run_script("train_tokenizer.py", reference_argv(reference_images, run_copy, "run.steps=4", "run.save_every=2",
                                                           "--resume", "auto"))
    assert code == 0, capfd.readouterr().err
    log = log_lines(caplog)
    assert f"warning: skipping damaged checkpoint {newest} ({reason}); trying an older one" in log
    assert any(f"resumed from step 2 on 1 ranks (checkpoint written by 1): {older}" in line for line in log), log
    assert damage(newest) is None  # written again by the resumed run


@pytest.mark.parametrize("harm", [truncate, change_a_byte, remove])
def test_resolve_checks_sizes_and_contents(run_copy, caplog, harm):
    newest, older = step_dir(run_copy, 4), step_dir(run_copy, 2)
    ck = Checkpointer(run_copy, 5, 0)
    assert ck.resolve("auto") == newest and ck.resolve(newest) == newest
    reason = harm(os.path.join(newest, MODEL_STATES))
    assert ck.resolve("auto") == older
    assert f"warning: skipping damaged checkpoint {newest} ({reason}); trying an older one" in log_lines(caplog)
    with pytest.raises(TrainingError) as e:
        ck.resolve(newest)
    assert str(e.value) == f"--resume {newest}: not a complete checkpoint ({reason})"


def test_an_explicit_damaged_checkpoint_is_a_one_line_error(run_copy, reference_images, capfd):
    ckpt = step_dir(run_copy, 4)
    reason = change_a_byte(os.path.join(ckpt, MODEL_STATES))
    capfd.readouterr()
    code = run_script("train_tokenizer.py", reference_argv(reference_images, run_copy, "run.steps=6", "--resume", ckpt))
    assert code == 2
    assert error_line(capfd.readouterr().err) == f"error: --resume {ckpt}: not a complete checkpoint ({reason})"
    assert not os.path.exists(os.path.join(run_copy, LOCK))


@pytest.mark.parametrize("override, problem", [
    ("model.quantizer.codebook_size=128", r"quantizer\.\S+ is \[64(, \d+)*\] in the checkpoint, \[128(, \d+)*\] in this model"),
    ("model.decoder.depth=3", r"this model has decoder\.\S*2\.\S+ \[[\d, ]+\], which the checkpoint lacks"),
    ("loss.disc_channels=16", r"\S+ is \[8(, \d+)*\] in the checkpoint, \[16(, \d+)*\] in this model"),
])
def test_a_config_that_no_longer_fits_the_checkpoint_is_a_one_line_error(run_copy, reference_images, capfd, override, problem):
    ckpt = step_dir(run_copy, 4)
    capfd.readouterr()
    code = run_script("train_tokenizer.py", reference_argv(reference_images, run_copy, "run.steps=6", override, "--resume", ckpt))
    assert code == 2
    line = error_line(capfd.readouterr().err)
    assert re.fullmatch(rf"error: {re.escape(ckpt)} does not match this config: {problem}", line), line


# ----------------------------------------------------------------------------- one run per output folder


def write_lock(out: str, pid: int, host: str) -> str:
    path = os.path.join(out, LOCK)
    with open(path, "w") as f:
        json.dump({"pid": pid, "host": host}, f)
    return path


@pytest.mark.parametrize("owner", ["live here", "elsewhere"])
def test_a_second_run_on_the_same_output_dir_is_refused(run_copy, reference_images, capfd, owner):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # a live process on this host, or any process on another host (whose liveness cannot be checked here)
        host = socket.gethostname() if owner == "live here" else "other-node"
        lock = write_lock(run_copy, sleeper.pid, host)
        with open(lock) as f:
            before = f.read()
        capfd.readouterr()
        code = run_script("train_tokenizer.py", reference_argv(reference_images, run_copy, "run.steps=6", "--resume", "auto"))
        assert code == 2
        assert error_line(capfd.readouterr().err) == (
            f"error: {run_copy} is in use by another run (pid {sleeper.pid} on {host}); wait for it to end, or "
            f"delete {lock} if no run uses that folder")
        with open(lock) as f:
            assert f.read() == before  # the owner's lock is left alone
        assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["step_00000002", "step_00000004"]
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("owner", ["killed here", "silent elsewhere"])
def test_a_stale_lock_is_taken_over(run_copy, reference_images, caplog, capfd, owner):
    caplog.set_level(logging.INFO, logger="vqrae")
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    if owner == "killed here":
        write_lock(run_copy, gone.pid, socket.gethostname())
    else:  # a run killed on another node: its heartbeat stopped longer ago than LOCK_STALE_S
        lock = write_lock(run_copy, os.getpid(), "other-node")
        past = time.time() - LOCK_STALE_S - 5
        os.utime(lock, (past, past))
    code = run_script("train_tokenizer.py", reference_argv(reference_images, run_copy, "run.steps=4", "--resume", "auto"))
    assert code == 0, capfd.readouterr().err
    assert any(line.startswith("done: 4 steps") for line in log_lines(caplog))
    assert not os.path.exists(os.path.join(run_copy, LOCK))


def test_the_lock_holder_keeps_its_lock_fresh(tmp_path, monkeypatch):
    from vqrae.runtime import lock as runtime

    monkeypatch.setattr(runtime, "LOCK_HEARTBEAT_S", 0.05)
    runtime.take_run_lock(str(tmp_path), rank=0)
    lock = os.path.join(tmp_path, LOCK)
    try:
        past = time.time() - 3600
        os.utime(lock, (past, past))
        for _ in range(100):
            time.sleep(0.05)
            if time.time() - os.path.getmtime(lock) < 60:
                break
        assert time.time() - os.path.getmtime(lock) < 60  # touched again by the heartbeat
    finally:
        runtime.release_run_lock(str(tmp_path))
    assert not os.path.exists(lock)
    os.utime(tmp_path)  # the heartbeat has stopped: nothing recreates or touches the removed lock
    time.sleep(0.2)
    assert not os.path.exists(lock)


# ----------------------------------------------------------------------------- full disk


class FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes into ``path``, then fails like a full disk (ENOSPC)."""

    def __init__(self, path: str, room: int):
        self.file, self.room = open(path, "wb"), room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = min(len(data), self.room)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.file.write(bytes(data[:n]))

    def close(self) -> None:
        self.file.close()
        super().close()


def fails_at_step_2(real, target: str, fail):
    """``real`` writer, except for the file named ``target`` in the step-2 checkpoint: ``fail(real, obj, path)``."""

    def writer(obj, path, *args, **kwargs):
        if isinstance(path, str) and path.endswith(target) and ".tmp-step_00000002" in path:
            return fail(real, obj, path)
        return real(obj, path, *args, **kwargs)

    return writer


def torch_save_on_a_full_disk(real, obj, path):
    with FullDisk(path, 4096) as f:  # torch.save's zip writer raises its own RuntimeError mid-file
        real(obj, f)


def safetensors_on_a_full_disk(real, obj, path):
    from safetensors import SafetensorError

    # what save_file raises on ENOSPC (it writes a temporary file and renames it, so never aim it at /dev/full)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("layer", ["torch.save", "safetensors"])
def test_a_serializer_error_during_a_save_is_one_line_and_leaves_nothing_partial(single_rank, assets, tmp_path,
                                                                                 monkeypatch, capfd, layer):
    import safetensors.torch

    out = str(tmp_path / "run")
    root = re.escape(os.path.join(out, "checkpoints"))
    if layer == "torch.save":  # DeepSpeed's own save of the generator's states
        monkeypatch.setattr(torch, "save", fails_at_step_2(torch.save, MODEL_STATES, torch_save_on_a_full_disk))
        inner = r"\[enforce fail at [^\]]+\] \. unexpected pos \d+ vs \d+"
    else:
        monkeypatch.setattr(safetensors.torch, "save_file",
                            fails_at_step_2(safetensors.torch.save_file, "ema.safetensors", safetensors_on_a_full_disk))
        inner = r"Error while serializing: I/O error: No space left on device \(os error 28\)"
    capfd.readouterr()
    assert run_script("train_tokenizer.py", tokenizer_argv(assets, out, "run.steps=2", "run.save_every=1")) == 2
    line = error_line(capfd.readouterr().err)
    previous = step_dir(out, 1)
    assert re.fullmatch(rf"error: writing the step 2 checkpoint failed \({inner}; [\d.]+ MiB free in {root}\); "
                        rf"last complete checkpoint: {re.escape(previous)}", line), line
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000001"]  # no .tmp-step_00000002
    assert Checkpointer(out, 5, 0).resolve("auto") == previous
    assert not os.path.exists(os.path.join(out, LOCK))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (one tiny checkpoint fits, two do not); skipped where mounting is not allowed."""
    where = str(tmp_path / "disk")
    os.makedirs(where)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", where], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True)


def test_a_full_disk_during_a_save_is_one_line_and_leaves_nothing_partial(single_rank, assets, small_disk, capfd):
    out = os.path.join(small_disk, "run")
    capfd.readouterr()
    assert run_script("train_tokenizer.py", tokenizer_argv(assets, out, "run.steps=2", "run.save_every=1")) == 2
    line = error_line(capfd.readouterr().err)
    previous = step_dir(out, 1)
    assert re.fullmatch(rf"error: writing the step 2 checkpoint failed \(.+\); last complete checkpoint: "
                        rf"{re.escape(previous)}", line), line
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000001"]
    assert damage(previous) is None
    assert not os.path.exists(os.path.join(out, LOCK))


# ----------------------------------------------------------------------------- safe loading stays exact


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_resume_through_the_safe_loader_is_bit_exact(single_rank, reference_run, reference_images, tmp_path, zero):
    """ZeRO 0, 2 and 3 (1 runs in tests/test_train_tokenizer.py): a run resumed from the reference run's step-2
    checkpoint in a fresh folder ends with the uninterrupted run's weights, bit for bit."""
    from safetensors.torch import load_file

    ref, out = reference_run(zero), str(tmp_path / "run")
    copy_checkpoint(ref, 2, out)
    argv = reference_argv(reference_images, out, f"run.zero_stage={zero}", "--resume", "auto")
    assert run_script("train_tokenizer.py", argv) == 0
    names = ["model/model.safetensors"] + (["ema.safetensors"] if zero != 3 else [])  # no EMA under ZeRO-3
    for name in names:
        a, b = load_file(os.path.join(step_dir(ref, 4), name)), load_file(os.path.join(step_dir(out, 4), name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the steps after the resume moved the weights: equality is not the checkpoint's weights compared to themselves
    start = load_file(os.path.join(step_dir(ref, 2), "model/model.safetensors"))
    end = load_file(os.path.join(step_dir(out, 4), "model/model.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start)
