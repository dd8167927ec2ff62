"""Crash-safe, self-verifying checkpoints: ``Checkpointer`` (temp folder + manifest + rename; ``--resume auto``
takes the newest intact one), ``save_checkpoint`` (one step's checkpoint, a failed write a one-line error),
``damage``/``is_complete`` (what a folder's manifest says is wrong with it), each rank's RNG state, and
``publish`` (the final model export)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors import SafetensorError

from .config import TrainingError
from .distributed import barrier, from_rank0
from .log import first_line

log = logging.getLogger("vqrae")

MANIFEST = "manifest.json"


class Checkpointer:
    """Crash-safe, self-verifying checkpoints under ``<output_dir>/checkpoints/step_<N>``.

    Every rank writes into ``.tmp-step_<N>``; after a barrier rank 0 writes ``manifest.json`` (step, and each
    file's size and blake2b digest) and renames the folder, so a folder without a manifest is never picked on
    resume. A failed write (full disk, permissions) raises before the rename and leaves earlier checkpoints
    untouched; ``discard`` removes the partial folder. On resume rank 0 checks the files against the manifest
    (sizes first, then digests) and the other ranks take its answer.

    Args:
        output_dir: run directory.
        keep_last: complete checkpoints kept; older ones are deleted after a successful save.
        rank: this process's rank.
    """

    def __init__(self, output_dir: str, keep_last: int, rank: int):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last, self.rank = keep_last, rank

    def tmp_dir(self, step: int) -> str:
        path = self._tmp_path(step)
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
        barrier()
        return path

    def _tmp_path(self, step: int) -> str:
        return os.path.join(self.root, f".tmp-step_{step:08d}")

    def discard(self, step: int) -> None:
        """Remove what a failed save of ``step`` left, so nothing partial stays on a full disk."""
        shutil.rmtree(self._tmp_path(step), ignore_errors=True)

    def commit(self, tmp: str, step: int, extra: Optional[dict] = None) -> str:
        barrier()
        final = os.path.join(self.root, f"step_{step:08d}")
        if self.rank == 0:
            names = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs)
            files = dict(zip(names, _map_files(_file_record, [os.path.join(tmp, n) for n in names])))
            with open(os.path.join(tmp, MANIFEST + ".tmp"), "w") as f:
                json.dump({"step": step, "time": time.time(), "files": files, **(extra or {})}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, MANIFEST + ".tmp"), os.path.join(tmp, MANIFEST))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for path in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def _saved(self) -> List[str]:
        if not os.path.isdir(self.root):
            return []
        return [os.path.join(self.root, n) for n in sorted(os.listdir(self.root)) if n.startswith("step_")]

    def complete(self) -> List[str]:
        """Complete checkpoints (manifest, every file at its recorded size), oldest first."""
        return [p for p in self._saved() if is_complete(p)]

    def resolve(self, resume: Optional[str]) -> Optional[str]:
        """``None`` -> no resume; ``"auto"`` -> newest intact checkpoint or none (damaged newer ones are skipped
        with a warning); else that directory, which must be intact. Call on every rank."""
        if not resume:
            return None
        path, error = from_rank0(self._pick(resume) if self.rank == 0 else None)
        if error:
            raise TrainingError(error)
        return path

    def _pick(self, resume: str) -> tuple[Optional[str], Optional[str]]:
        """(checkpoint, None) or (None, error message); rank 0 only: it reads every byte of the candidate."""
        if resume != "auto":
            problem = damage(resume)
            if problem:
                return None, f"--resume {resume}: not a complete checkpoint ({problem})"
            return resume, None
        for path in reversed(self._saved()):
            problem = damage(path)
            if not problem:
                return path, None
            log.warning(f"warning: skipping damaged checkpoint {path} ({problem}); trying an older one")
        return None, None


# What a save on a full disk or lost mount raises, by layer: the OS, torch.save's zip writer, safetensors
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


def save_failed(err: BaseException, ckpt: Checkpointer, step: int, last: Optional[str]) -> TrainingError:
    """The one-line error for a failed save of ``step``, after removing its partial folder."""
    if isinstance(err, TrainingError):
        return err
    why = first_line(err)
    if not isinstance(err, OSError):  # the serializers' messages do not say the disk is full; the numbers do
        try:
            why += f"; {shutil.disk_usage(ckpt.root).free / 2**20:.1f} MiB free in {ckpt.root}"
        except OSError:
            pass
    ckpt.discard(step)
    return TrainingError(f"writing the step {step} checkpoint failed ({why}); last complete checkpoint: "
                         f"{last or 'none'}")


HASH_CHUNK = 8 << 20


def _file_record(path: str) -> dict:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return {"size": os.path.getsize(path), "blake2b": h.hexdigest()}


def _map_files(fn, paths: List[str]) -> list:
    # hashlib releases the GIL on large buffers: a multi-GB checkpoint hashes on several cores at once
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, paths))


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def _manifest_files(path: str) -> Dict[str, Optional[dict]]:
    """relative name -> {size, blake2b}; a manifest that lists names only (older checkpoints) gives None."""
    files = read_manifest(path)["files"]
    if isinstance(files, list):
        return {str(n): None for n in files}
    return {str(n): dict(rec) for n, rec in files.items()}


def damage(path: str) -> Optional[str]:
    """What is wrong with a checkpoint folder (no manifest, a file missing, truncated or changed), or None.

    Sizes are compared first (cheap), digests only once every size matches.
    """
    try:
        files = _manifest_files(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {MANIFEST}"
    for name, rec in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if rec is not None and os.path.getsize(full) != rec.get("size"):
            return f"{name} has {os.path.getsize(full)} bytes, the manifest says {rec.get('size')}"
    checked = [n for n, rec in files.items() if rec is not None and "blake2b" in rec]
    try:
        digests = _map_files(_file_record, [os.path.join(path, n) for n in checked])
    except OSError as e:
        return f"cannot read it: {e}"
    for name, got in zip(checked, digests):
        if got["blake2b"] != files[name]["blake2b"]:
            return f"{name} does not match its checksum"
    return None


def is_complete(path: str) -> bool:
    """A checkpoint folder with a readable manifest whose files all exist at their recorded sizes (a copy can
    lose or truncate some). ``damage`` also checks the contents."""
    try:
        files = _manifest_files(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all(os.path.isfile(os.path.join(path, n)) and (rec is None or os.path.getsize(os.path.join(path, n))
               == rec.get("size")) for n, rec in files.items())

def publish(checkpoint: str, export_dir: str) -> None:
    """Copy a checkpoint's exported model to ``export_dir``, replacing it only once the copy is complete."""
    tmp = export_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(checkpoint, "model"), tmp)
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)


def save_checkpoint(s, step: int, last: Optional[str], write: Callable[[str], None]) -> str:
    """One checkpoint of ``step`` of the run ``s`` (a ``session.Session``: its ``ckpt`` and ``rank``): ``write(folder)``
    stores the engines and (rank 0) the trainer state, this function the RNG, then the manifest is committed. A
    failed write (full disk, lost mount) leaves the earlier checkpoints as they were and is a one-line
    ``TrainingError`` naming ``last``, the newest complete one."""
    try:
        tmp = s.ckpt.tmp_dir(step)
        write(tmp)
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{s.rank}.pt"))
        return s.ckpt.commit(tmp, step)
    except SAVE_ERRORS as e:
        raise save_failed(e, s.ckpt, step, last) from None


# -- RNG ----------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = json.loads(state["numpy"])
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
