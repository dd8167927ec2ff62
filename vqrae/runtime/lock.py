"""One run per output folder: rank 0 holds ``<output_dir>/run.lock`` (its pid and host) while the run lasts and
touches it every ``LOCK_HEARTBEAT_S``; a killed run's lock is taken over as stale."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Dict, Optional

from .config import TrainingError
from .distributed import from_rank0

LOCK = "run.lock"
LOCK_HEARTBEAT_S = 30.0  # the holder touches its lock this often
LOCK_STALE_S = 120.0  # a lock of another host untouched this long belongs to a run that died there
_heartbeats: Dict[str, threading.Event] = {}


def take_run_lock(output_dir: str, rank: int) -> None:
    """Rank 0 creates ``<output_dir>/run.lock`` (its pid and host) atomically and touches it every
    ``LOCK_HEARTBEAT_S`` while it holds it. A lock is stale, and taken over, when its process no longer exists on
    this host, or when it comes from another host and has not been touched for ``LOCK_STALE_S`` (a run killed
    there: a requeued job may start on any node). Every rank raises the same one-line ``TrainingError`` when
    another run holds it. ``release_run_lock`` removes it."""
    path = os.path.join(output_dir, LOCK)
    error = from_rank0(_take_lock(path) if rank == 0 else None)
    if error:
        raise TrainingError(error)
    if rank == 0:
        stop = _heartbeats[os.path.abspath(path)] = threading.Event()
        threading.Thread(target=_heartbeat, args=(path, stop), daemon=True, name="run-lock-heartbeat").start()


def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(LOCK_HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:  # removed or unreachable for a moment: the next beat tries again
            pass


def _lock_owner(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _take_lock(path: str) -> Optional[str]:
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None and (not _alive(owner["pid"]) if owner.get("host") == me["host"]
                                      else _silent_for(path) > LOCK_STALE_S):
                try:  # stale: its run was killed; another starter may remove it first, then O_EXCL decides
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            who = f"pid {owner['pid']} on {owner.get('host')}" if owner else "a run whose lock is unreadable"
            return (f"{os.path.dirname(path) or '.'} is in use by another run ({who}); wait for it to end, or "
                    f"delete {path} if no run uses that folder")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return None
    return f"cannot take {path}: other runs keep starting in that folder"


def _silent_for(path: str) -> float:
    """Seconds since the lock at ``path`` was last touched (0 when it cannot be read)."""
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def release_run_lock(output_dir: str) -> None:
    """Remove ``<output_dir>/run.lock`` if this process holds it (a no-op on other ranks or another run's)."""
    path = os.path.join(output_dir, LOCK)
    stop = _heartbeats.pop(os.path.abspath(path), None)
    if stop is not None:
        stop.set()
    owner = _lock_owner(path)
    if owner and owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
        os.remove(path)

