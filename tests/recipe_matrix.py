"""Every shipped recipe (each YAML under configs/tokenizer/ and configs/mllm/) trained for two optimizer steps
through the trainers' ``train`` (``vqrae.train``, ``mllm.train``), in one process, with only its sizes shrunk.

What a recipe says about *how* it trains stays: precision, ZeRO stage and DeepSpeed JSON, stage, loss terms
and weights, EMA, LoRA, freezing, schedule, data format. What changes: widths, depths, K, e, image size, batch
sizes (still with gradient accumulation), steps; hub models become tiny local ones of the same family (a timm
encoder keeps its registered name and is loaded from a local weights file through the pretrained path; the
Hugging Face SigLIP2 tower becomes a local SigLIP vision model; LLMs become 2-layer LLaMA/Qwen3 directories);
data become tiny local sets in the recipe's format (image folder or LLaVA JSON); the GAN starts at step 0 so its
path runs. Chains resolve by output folder: a recipe whose ``init_from`` or ``model.vqrae`` names another
recipe's export runs after it and starts from what it wrote.

    python -m tests.recipe_matrix OUT_DIR [RECIPE.yaml ...]     # writes OUT_DIR/results.json
"""
from __future__ import annotations

import gc
import glob
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "tokenizer", "*.yaml")))
MLLM_RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "mllm", "*.yaml")))
# Variants run as cells of their own: the LoRA fine-tuning the SFT recipe documents, and bf16 tokenizer training
# at the ZeRO stages no recipe ships (the paper recipes use ZeRO-1), stage 2 included.
_TINY1, _TINY2 = "configs/tokenizer/tiny_stage1.yaml", "configs/tokenizer/tiny_stage2.yaml"
VARIANTS = {
    "llava15_sft+lora": ("configs/mllm/llava15_sft.yaml", ["model.lora.enabled=true", "optim.lr=2.0e-4"]),
    **{f"tiny_stage1+bf16+zero{z}": (_TINY1, ["run.precision=bf16", f"run.zero_stage={z}"]) for z in (0, 2, 3)},
    "tiny_stage2+bf16+zero3": (_TINY2, ["run.precision=bf16", "run.zero_stage=3"]),
}
TINY_TIMM = "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}"
IMAGE = 32
STEPS = 2


def recipe_names() -> list[str]:
    """Cell names: each recipe's path relative to the repository, then the variants."""
    return [os.path.relpath(p, ROOT) for p in TOKENIZER_RECIPES + MLLM_RECIPES] + sorted(VARIANTS)


class Assets:
    """Tiny stand-ins for what recipes name outside the repository, written once under ``root``."""

    def __init__(self, root: str):
        self.root = root
        self._done: dict = {}

    def _once(self, key, make):
        if key not in self._done:
            self._done[key] = make()
        return self._done[key]

    def shapes(self) -> str:
        from demo.shapes import write_imagefolder

        def make():
            path = os.path.join(self.root, "shapes")
            write_imagefolder(path, 24, 4, seed=0, size=IMAGE)
            return path

        return self._once("shapes", make)

    def llava_json(self) -> str:
        """LLaVA conversation JSON with relative image paths under its image_root."""

        def make():
            import random

            from demo.shapes import questions, render, sample_attrs

            folder = os.path.join(self.root, "llava")
            os.makedirs(os.path.join(folder, "images"), exist_ok=True)
            rng, records = random.Random(0), []
            for i in range(16):
                attrs = sample_attrs(rng, "train")
                render(attrs, IMAGE).save(os.path.join(folder, "images", f"{i:03d}.png"))
                q, a = questions(attrs)[0]
                records.append({"id": str(i), "image": f"images/{i:03d}.png", "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
            path = os.path.join(folder, "conversations.json")
            with open(path, "w") as f:
                json.dump(records, f)
            return path

        return self._once("llava", make)

    def timm_weights(self, name: str) -> str:
        """A safetensors file of the shrunk timm model ``name``, loaded the way a downloaded checkpoint is."""

        def make():
            import timm
            import torch
            from safetensors.torch import save_file

            torch.manual_seed(0)
            model = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0, img_size=IMAGE,
                                      patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
            path = os.path.join(self.root, "timm", name.replace("/", "_") + ".safetensors")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
            return path

        return self._once(("timm", name), make)

    def hf_vision(self) -> str:
        """A local SigLIP vision tower (config, weights, image processor), as a hub snapshot would hold."""

        def make():
            import torch
            from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

            torch.manual_seed(0)
            path = os.path.join(self.root, "siglip_vision")
            cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=IMAGE, patch_size=8)
            SiglipVisionModel(cfg).save_pretrained(path)
            SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
            return path

        return self._once("hf_vision", make)

    def llm(self, family: str) -> str:
        from tests.helpers import write_llm

        return self._once(("llm", family), lambda: write_llm(os.path.join(self.root, f"llm_{family}"), family))

    def tiny_vqrae(self) -> str:
        from tests.helpers import write_vqrae

        return self._once("vqrae", lambda: write_vqrae(os.path.join(self.root, "vqrae")))


def _norm(path: str) -> str:
    return os.path.normpath(path.rstrip("/"))


class Matrix:
    """Runs the cells, each after the cells whose exports it starts from."""

    def __init__(self, out: str):
        self.out = out
        self.assets = Assets(os.path.join(out, "assets"))
        self.results: dict = {}
        self.exports: dict = {}  # a recipe's own output_dir + /model -> the cell that writes it
        for name in recipe_names():
            if name in VARIANTS:  # a variant shares its recipe's output folder; the recipe's export is the one named
                continue
            cfg = self._load(name)
            self.exports[_norm(os.path.join(cfg.run.output_dir, "model"))] = name

    def _source(self, name: str) -> tuple[str, list[str]]:
        if name in VARIANTS:
            return VARIANTS[name]
        return name, []

    def _kind(self, name: str) -> str:
        return "tokenizer" if self._source(name)[0].startswith("configs/tokenizer") else "mllm"

    def _load(self, name: str, overrides=()):
        from vqrae.config import load_config

        path, extra = self._source(name)
        if self._kind(name) == "tokenizer":
            from vqrae.train import TokenizerTrainConfig as schema
        else:
            from mllm.train import MLLMTrainConfig as schema
        return load_config(schema, os.path.join(ROOT, path), list(extra) + list(overrides))

    def _export_of(self, path: str) -> str | None:
        """The cell whose export ``path`` names, run first; None when no recipe writes it."""
        dep = self.exports.get(_norm(path))
        if dep is None:
            return None
        self.run(dep)
        if self.results[dep]["status"] != "ok":
            raise RuntimeError(f"it starts from {dep}, which failed")
        return os.path.join(self.results[dep]["output_dir"], "model")

    # -- overrides ---------------------------------------------------------------------------------------
    def _tokenizer_overrides(self, name: str, cfg) -> list[str]:
        enc = cfg.model.encoder
        o = [f"model.encoder.image_size={IMAGE}", f"model.encoder.model_kwargs={TINY_TIMM}",
             "model.quantizer.codebook_size=64", "model.quantizer.codebook_dim=16",
             "model.decoder.patch_size=8", f"model.decoder.image_size={IMAGE}",
             "loss.lpips_backbone=random", "loss.gan_start_step=0", "loss.disc_channels=8",
             f"data.source={self.assets.shapes()}", f"data.resolution={IMAGE}", "data.num_workers=0"]
        if enc.backend == "hf":  # the tower's own config holds its sizes
            o += [f"model.encoder.name={self.assets.hf_vision()}", "model.encoder.model_kwargs={}"]
        elif enc.pretrained:  # the recipe's pretrained path, from a local file of the shrunk architecture
            o += [f"model.encoder.weights={self.assets.timm_weights(enc.name)}"]
        if cfg.stage == 2:
            export = self._export_of(cfg.init_from)
            if export is None:
                raise RuntimeError(f"init_from {cfg.init_from} is no recipe's export")
            o += [f"init_from={export}"]
        return o

    def _mllm_overrides(self, name: str, cfg) -> list[str]:
        o = ["data.num_workers=0"]
        if cfg.init_from:
            export = self._export_of(cfg.init_from)
            if export is None:
                raise RuntimeError(f"init_from {cfg.init_from} is no recipe's export")
            o += [f"init_from={export}"]
        else:
            family = "llama" if re.search(r"llama|vicuna", cfg.model.llm, re.I) else "qwen3"
            o += [f"model.llm={self.assets.llm(family)}"]
            vqrae = self._export_of(cfg.model.vqrae) or self.assets.tiny_vqrae()
            o += [f"model.vqrae={vqrae}"]
        for task in ("generation", "understanding"):
            src = getattr(cfg.data, task).source
            if not src:
                continue
            if src.endswith(".json") or src.endswith(".jsonl"):
                o += [f"data.{task}.source={self.assets.llava_json()}",
                      f"data.{task}.image_root={os.path.dirname(self.assets.llava_json())}"]
            else:
                o += [f"data.{task}.source={self.assets.shapes()}"]
        return o

    # -- cells -------------------------------------------------------------------------------------------
    def run(self, name: str) -> dict:
        if name in self.results:
            return self.results[name]
        self.results[name] = {"status": "running"}
        out_dir = os.path.join(self.out, "runs", re.sub(r"[^\w.+-]", "_", name))
        t0 = time.time()
        lines: list[str] = []
        handler = _Collect(lines)
        logging.getLogger("vqrae").addHandler(handler)
        try:
            cfg = self._load(name)
            sizes = self._tokenizer_overrides(name, cfg) if self._kind(name) == "tokenizer" else self._mllm_overrides(name, cfg)
            common = [f"run.output_dir={out_dir}", f"run.steps={STEPS}", "run.batch_size=2", "run.micro_batch_size=1",
                      f"run.save_every={STEPS}", "run.log_every=1", "run.image_every=1", "run.progress_bar=false"]
            if self._kind(name) == "tokenizer":
                from vqrae.train import train
            else:
                from mllm.train import train
            overrides = [*sizes, *common]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train(self._load(name, overrides))
            result = {"status": "ok", "overrides": overrides}
        except BaseException as e:  # noqa: BLE001 - a cell's failure is its result; the matrix goes on
            result = {"status": "failed", "error": f"{type(e).__name__}: {str(e).strip()[:2000]}",
                      "traceback": traceback.format_exc()[-4000:]}
        finally:
            logging.getLogger("vqrae").removeHandler(handler)
        result.update({"output_dir": out_dir, "seconds": round(time.time() - t0, 1), "log": lines[-20:],
                       "steps": [int(m) for line in lines for m in re.findall(r"^step (\d+) ", line)],
                       "losses": _losses(lines)})
        self.results[name] = result
        print(f"{result['status']:>6} {result['seconds']:6.1f}s  {name}", flush=True)
        return result


class _Collect(logging.Handler):
    def __init__(self, lines: list):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record):
        self.lines.append(record.getMessage())


def _losses(lines: list[str]) -> dict:
    out: dict = {}
    for line in lines:
        for key, value in re.findall(r"([\w/]*loss[\w/]*)=([-\w.+]+)", line):  # loss/recon, generation/loss
            out.setdefault(key, []).append(float(value))
    return out


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit(__doc__)
    out, wanted = args[0], args[1:] or recipe_names()
    os.makedirs(out, exist_ok=True)
    sys.path.insert(0, ROOT)
    matrix = Matrix(out)
    # What the imports and the assets made stays for the whole process: out of the collector's sight, DeepSpeed's
    # gc.collect() at each ZeRO-3 engine's set-up walks only what the runs create (0.4 s less each time).
    gc.freeze()
    for name in wanted:
        matrix.run(name)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(matrix.results, f, indent=1, default=str)
    ran = [n for n in matrix.results]
    print(f"recipes run ({len(ran)}): {', '.join(ran)}")
    failed = [n for n, r in matrix.results.items() if r["status"] != "ok"]
    for n in failed:
        print(f"FAILED {n}: {matrix.results[n]['error']}\n{matrix.results[n].get('traceback', '')}")


if __name__ == "__main__":
    main()
