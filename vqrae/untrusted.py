"""Checks before reading model files someone else wrote.

Two kinds of file run code while they load: pickles (``torch.load`` of a ``.bin``/``.pt``/``.pth``/``.pkl``) and
Python shipped beside a Hugging Face model (an ``auto_map`` in its JSON configs, run under ``trust_remote_code``).
Weights are therefore read from safetensors only, and shipped code runs only when the caller, never the file,
says so. Every refusal is a one-line ``ConfigError`` naming the file and the safe way to proceed.
"""
from __future__ import annotations

import json
import os

import torch

from .config import ConfigError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Hugging Face JSON files whose ``auto_map`` names Python classes to import from the model's directory.
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


def refuse_pickle(path: str, what: str, alternative: str) -> None:
    """Refuse a single weights file that is a pickle; ``alternative`` says what to pass instead."""
    if is_pickle(path):
        raise ConfigError(f"{what} '{path}' is a pickle, which can run code when loaded; {alternative}")


def refuse_pickled_weights(directory: str, what: str, alternative: str) -> None:
    """Refuse a local model directory whose weights exist only as pickles (the loaders read safetensors only)."""
    if not os.path.isdir(directory):
        return
    names = sorted(os.listdir(directory))
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if is_pickle(n)]
    if pickles:
        raise ConfigError(
            f"{what} '{directory}' holds pickled weights ({os.path.join(directory, pickles[0])}), which can run "
            f"code when loaded; {alternative}"
        )


def ships_code(directory: str) -> str | None:
    """The first JSON config of a local directory that maps classes to Python files in it, or None."""
    if not os.path.isdir(directory):
        return None
    for name in _CODE_CONFIGS:
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue  # the loader itself reports an unreadable config
        if isinstance(data, dict) and "auto_map" in data:
            return file
    return None


def refuse_remote_code(directory: str, what: str, opt_in: str) -> None:
    """Refuse a directory that ships model code when the caller has not opted in (``opt_in`` says how)."""
    file = ships_code(directory)
    if file is not None:
        raise ConfigError(
            f"{what} '{directory}' ships its own Python code (auto_map in {file}); {opt_in} to run it, only if you "
            "trust its source"
        )


def read_safetensors(path: str, what: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a missing, truncated or corrupt file as a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{what} '{path}' cannot be read ({detail}); the file is damaged or incomplete") from None
