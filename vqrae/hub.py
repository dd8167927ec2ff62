"""Models shared through the Hugging Face Hub: resolving ``owner/name`` ids to local snapshots, and model cards.

``from_pretrained`` of ``VQRAE`` and ``UnifiedModel`` takes a directory or a hub id; an id is downloaded (or
found in the cache: ``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1`` for the cache only) by
``huggingface_hub.snapshot_download`` and the loaders then read that snapshot exactly as they read a directory,
with the same safety checks (``untrusted.py``). Only data files are downloaded: weights as safetensors, configs,
tokenizer files and the card, never pickles or Python files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Optional

import yaml

# Everything a VQRAE or unified-model export holds (safetensors, YAML/JSON configs, tokenizer vocabularies and
# chat templates, the card). A pickle or a .py file in the repo is never fetched.
# Patterns match the path inside the repo, and '*' crosses '/' (fnmatch), so they reach llm/, tokenizer/, vqrae/.
ALLOW_PATTERNS = ["*.safetensors", "*.yaml", "*.json", "*.txt", "*.jinja", "*tokenizer.model", "README.md"]
CARD_NAME = "README.md"
METRICS_NAME = "metrics.json"  # scripts/eval_tokenizer.py --out
TRAIN_CONFIG_NAME = "train_config.yaml"  # written by the training scripts into run.output_dir

# The Hub's repo id rules: two parts of letters, digits, '-', '_', '.', not starting with '.' or '-'.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*$")
# What the card says per kind of model, and which file of its export holds the config shown.
_KINDS = {
    "vqrae": dict(
        summary="VQRAE image tokenizer: a vision foundation model encoder, a SimVQ quantizer and a ViT decoder.",
        load=("from vqrae import VQRAE", "VQRAE"), config="config.yaml",
        tags=["vqrae", "image-tokenizer", "vector-quantization"],
    ),
    "mllm": dict(
        summary="Unified multimodal model: a causal LM that reads VQRAE features and generates VQRAE image codes.",
        load=("from mllm import UnifiedModel", "UnifiedModel"), config="mllm.yaml",
        tags=["vqrae", "unified-multimodal", "text-to-image", "image-text-to-text"],
    ),
}


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".git")


def resolve(name: str, revision: Optional[str] = None, what: str = "model") -> str:
    """A local directory for ``name``: the directory itself, or the snapshot of hub repo ``name`` at ``revision``.

    A missing local path is an error without any hub lookup; so is an id the hub (or, offline, the cache) cannot
    give. Both are one-line ``FileNotFoundError``s.
    """
    if os.path.exists(name):
        if revision is not None:
            raise ValueError(f"revision '{revision}' applies to hub ids only, but '{name}' is a local path")
        return name
    if not is_hub_id(name):
        raise FileNotFoundError(f"no {what} at '{name}': no such directory, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return snapshot_download(name, revision=revision, allow_patterns=ALLOW_PATTERNS, library_name="vqrae")
    except (OSError, HfHubHTTPError, HFValidationError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]  # its first sentence
        raise FileNotFoundError(
            f"{what} '{name}' is not a local directory, and the hub could not be reached or has no repo '{name}' "
            f"at revision '{revision or 'main'}' ({type(e).__name__}: {detail})"
        ) from None


def read_run_info(run_dir: str) -> tuple[list[str], Optional[dict]]:
    """Training data sources and evaluation metrics found in ``run_dir`` or the folder above it.

    A training run writes ``train_config.yaml`` into its output directory and the export into ``model/`` below
    it; ``metrics.json`` is what ``scripts/eval_tokenizer.py --out`` writes. Either may be absent.
    """
    sources: list[str] = []
    metrics = None
    for folder in (run_dir, os.path.dirname(os.path.abspath(run_dir))):
        config = os.path.join(folder, TRAIN_CONFIG_NAME)
        if not sources and os.path.isfile(config):
            with open(config) as f:
                sources = _data_sources((yaml.safe_load(f) or {}).get("data"))
        file = os.path.join(folder, METRICS_NAME)
        if metrics is None and os.path.isfile(file):
            with open(file) as f:
                metrics = json.load(f)
    return sources, metrics


def _data_sources(node: Any) -> list[str]:
    """Every non-empty ``source`` under a training config's ``data`` section (one per task for the MLLM)."""
    if not isinstance(node, dict):
        return []
    found = [node["source"]] if isinstance(node.get("source"), str) and node["source"] else []
    return found + [s for key, value in node.items() if key != "source" for s in _data_sources(value)]


def write_model_card(
    folder: str,
    kind: str,
    config_dict: dict,
    metrics: Optional[dict] = None,
    repo_id: str = "owner/name",
    data_sources: Optional[list[str]] = None,
) -> str:
    """Write ``folder/README.md``: YAML front matter, how to load, the config, data sources and metrics."""
    if kind not in _KINDS:
        raise ValueError(f"model card kind must be one of {', '.join(_KINDS)}, not '{kind}'")
    info = _KINDS[kind]
    import_line, cls = info["load"]
    front = yaml.safe_dump({"library_name": "vqrae", "tags": info["tags"]}, sort_keys=False)
    lines = [
        "---", front.rstrip(), "---", "", f"# {repo_id.split('/')[-1]}", "", info["summary"], "", "## Load", "",
        "```python", import_line, f'model = {cls}.from_pretrained("{repo_id}")', "```", "",
        "## Config", "", "```yaml", yaml.safe_dump(config_dict, sort_keys=False).rstrip(), "```",
    ]
    if data_sources:
        lines += ["", "## Training data", ""] + [f"- `{s}`" for s in data_sources]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in metrics.items() if not isinstance(v, (dict, list))]
    path = os.path.join(folder, CARD_NAME)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def push_folder(
    save: Callable[[str], None],
    kind: str,
    repo_id: str,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload model",
    run_dir: Optional[str] = None,
):
    """``save`` (a ``save_pretrained``) into a temporary folder, add the card, upload it as one commit.

    The repo (and the ``revision`` branch) is created if missing; returns the hub's ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    if not is_hub_id(repo_id):
        raise ValueError(f"repo_id must look like owner/name, not '{repo_id}'")
    folder = tempfile.mkdtemp(prefix="vqrae_push_")
    try:
        prepare_upload(save, folder, kind, repo_id, run_dir)
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare_upload(
    save: Callable[[str], None],
    folder: str,
    kind: str,
    repo_id: str = "owner/name",
    run_dir: Optional[str] = None,
) -> str:
    """The folder ``push_folder`` uploads: the saved model plus its card, whose config is the one saved (what
    ``from_pretrained`` will rebuild) and whose data sources and metrics come from ``run_dir``."""
    if kind not in _KINDS:
        raise ValueError(f"model card kind must be one of {', '.join(_KINDS)}, not '{kind}'")
    save(folder)
    with open(os.path.join(folder, _KINDS[kind]["config"])) as f:
        config = yaml.safe_load(f)
    sources, metrics = read_run_info(run_dir) if run_dir else ([], None)
    write_model_card(folder, kind, config, metrics, repo_id=repo_id, data_sources=sources)
    return folder


class PushToHub:
    """``push_to_hub`` for a model class with ``save_pretrained``; ``HUB_KIND`` ("vqrae" or "mllm") picks its
    model card."""

    HUB_KIND = "model"

    def push_to_hub(self, repo_id: str, revision: Optional[str] = None, private: Optional[bool] = None,
                    commit_message: Optional[str] = None, run_dir: Optional[str] = None):
        """Upload ``save_pretrained`` output plus a model card to hub repo ``repo_id`` (created if missing).

        ``run_dir``: a training output directory (or the export in it) whose ``train_config.yaml`` data sources
        and ``metrics.json`` go into the card. Returns the hub's ``CommitInfo``.
        """
        message = commit_message or f"Upload {self.HUB_KIND}"
        return push_folder(self.save_pretrained, self.HUB_KIND, repo_id, revision, private, message, run_dir)
