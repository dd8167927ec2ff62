"""The shipped paper recipes at full model shape on one GPU: does each train, how fast, in how much memory.

    bash bench/check_recipes_gpu.sh                  # one CUDA GPU; the table also goes to $OUT/recipes_gpu.md
    bash bench/check_recipes_gpu.sh --tiny           # the same pipeline, shrunk, on a CPU

Nothing is downloaded: encoders start from random init (``model.encoder.pretrained=false``), LPIPS uses a
random VGG trunk (``loss.lpips_backbone=random``), the LLM is a random Qwen3-0.6B-shaped model with a
word-level tokenizer written here, and the images are procedural 256 px pictures with captions
(``demo.shapes``) written to a temporary imagefolder, enough that no run crosses an epoch boundary. Every
run goes through the real entry points under the ``deepspeed`` launcher (one process), in the recipe's
precision and ZeRO stage, with ``batch_size`` equal to ``micro_batch_size`` (no accumulation):

  tokenizer  siglip2_so400m and dinov2_base, stage 1 then stage 2 from the stage-1 export just written;
             ``--steps`` steps (default 20) with the GAN on from step 0 (``loss.gan_start_step=0``), at the
             largest micro-batch of ``--micro-batches`` (64, 32, 16) that does not run out of memory.
  mllm       qwen3_0p6b_generation over the siglip2 stage-1 export, its codes computed first by
             ``scripts/tokenize_dataset.py`` as the README does, at the recipe's micro-batch.

Speed is the trainers' own logged rate (``img_per_s``, ``tokens_per_s``) averaged over the logging windows
after the first (the first holds cuDNN/allocator warm-up). Peak memory is the device's used memory sampled
by ``nvidia-smi`` every 0.2 s, less what was in use before the run (on a CPU: resident memory of the run's
processes). FLOPs of one training step are counted afterwards with ``torch.utils.flop_counter`` (matmuls and
convolutions, forward and backward, as ``bench/bench_train_step.py`` counts them) on the same model, loss and
data; MFU = FLOPs per image (token) x images (tokens) per second / ``--peak-tflops`` (989: H100 dense bf16,
used for an H200 too, whose dense bf16 peak is the same).

``--tiny`` shrinks widths, depths, K, e and the image size through the same dotted overrides (2 steps, CPU,
the recipe's precision) to show on any machine that the whole check runs end to end. The exit status is 1 if
any recipe failed; the table says which and why.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

QWEN3_0P6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  intermediate_size=3072, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6)
QWEN3_VOCAB = 151936  # rows of Qwen3's embedding and LM head
QWEN3_TOKENIZER_LEN = 151669  # len() of the Qwen3 tokenizer: with the K code tokens the LM head grows past 151936
OOM = re.compile(r"out of memory|OutOfMemoryError", re.IGNORECASE)


@dataclass
class Recipe:
    name: str
    kind: str  # "tokenizer" or "mllm"
    config: str
    needs: Optional[str] = None  # the recipe whose export this one starts from
    tiny: list[str] = field(default_factory=list)  # --tiny overrides of the model shape


def _tiny_encoder(image_size: int, patch: int) -> list[str]:
    return [f"model.encoder.image_size={image_size}", f"model.encoder.model_kwargs.patch_size={patch}",
            "model.encoder.model_kwargs.embed_dim=32", "model.encoder.model_kwargs.depth=2",
            "model.encoder.model_kwargs.num_heads=2", "model.encoder.model_kwargs.mlp_ratio=2.0",
            "model.quantizer.codebook_size=64", "model.quantizer.codebook_dim=16",
            "model.decoder.image_size=32", "model.decoder.patch_size=8"]


# The same 4 x 4 token grid as the recipes' 16 x 16: p16 at 32 px for SigLIP2, p7 at 28 px -> p8 at 32 px for DINOv2.
RECIPES = [
    Recipe("siglip2_so400m_stage1", "tokenizer", "configs/tokenizer/siglip2_so400m_stage1.yaml", tiny=_tiny_encoder(32, 8)),
    Recipe("siglip2_so400m_stage2", "tokenizer", "configs/tokenizer/siglip2_so400m_stage2.yaml", "siglip2_so400m_stage1"),
    Recipe("dinov2_base_stage1", "tokenizer", "configs/tokenizer/dinov2_base_stage1.yaml", tiny=_tiny_encoder(28, 7)),
    Recipe("dinov2_base_stage2", "tokenizer", "configs/tokenizer/dinov2_base_stage2.yaml", "dinov2_base_stage1"),
    Recipe("qwen3_0p6b_generation", "mllm", "configs/mllm/qwen3_0p6b_generation.yaml", "siglip2_so400m_stage1"),
]


@dataclass
class Result:
    recipe: Recipe
    status: str = "not run"
    micro_batch: Optional[int] = None
    rate: Optional[float] = None  # images/s or tokens/s, steady state
    peak_mib: Optional[float] = None
    flops_per_item: Optional[float] = None  # per image or per token
    wall_s: float = 0.0
    overrides: list[str] = field(default_factory=list)  # of the successful launch

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------- launching


class PeakMemory:
    """Samples memory in a thread while a run lasts: the GPU's used MiB (``nvidia-smi``) on CUDA, else the
    resident MiB of ``pid`` and its children. ``peak`` is the largest sample less the one before the run."""

    def __init__(self, pid: int, cuda: bool, interval: float = 0.2):
        self.pid, self.cuda, self.interval = pid, cuda, interval
        self.base = self._sample() if cuda else 0.0
        self.top = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> Optional[float]:
        if self.cuda:
            index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", index], capture_output=True, text=True, timeout=10)
                return float(out.stdout.strip().splitlines()[0])
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return None
        import psutil

        try:
            proc = psutil.Process(self.pid)
            procs = [proc] + proc.children(recursive=True)
        except psutil.Error:
            return None
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._sample()
            if value is not None and (self.top is None or value > self.top):
                self.top = value

    def stop(self) -> Optional[float]:
        self._stop.set()
        self._thread.join()
        if self.top is None:
            return None
        return self.top - (self.base or 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], log_path: str, timeout: float, cuda: bool) -> tuple[int, str, float, Optional[float]]:
    """Run ``cmd`` from the repository root with its output in ``log_path``; exit status, output, seconds, peak MiB."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        memory = PeakMemory(proc.pid, cuda)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher's process group: the launcher and its rank
            rc = proc.wait()
            log.write(f"\ntimed out after {timeout:.0f} s\n")
        peak = memory.stop()
    with open(log_path) as f:
        return rc, f.read(), time.time() - start, peak


def deepspeed_cmd(script: str, config: str, overrides: list[str]) -> list[str]:
    # python -m deepspeed.launcher.runner is what the `deepspeed` command runs, without relying on PATH
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
            script, "--config", config, *overrides]


def logged(text: str, key: str) -> list[float]:
    """Every value of ``key`` in the trainers' console lines (``RunLogger.scalars``: `` key=value``)."""
    return [float(v) for v in re.findall(rf"(?:^|\s){re.escape(key)}=([-+\d.einfa]+)", text, flags=re.MULTILINE)]


def steady(values: list[float]) -> Optional[float]:
    """Mean of the logging windows after the first, which holds the warm-up steps."""
    if not values:
        return None
    return statistics.fmean(values[1:]) if len(values) > 1 else values[0]


def failure(text: str, rc: int) -> str:
    """One line for the table: the trainer's ``error:`` line, else the last exception line, else the status."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for pattern in (r"error: ", r"^\S*(Error|Exception)\b.*:", r"timed out after"):
        hits = [l for l in lines if re.search(pattern, l)]
        if hits:
            return hits[-1][:200].replace("|", "/")
    return f"exit status {rc}"


# ----------------------------------------------------------------------------- assets


def write_images(root: str, count: int, size: int) -> str:
    """Procedural captioned pictures (imagefolder ``train/`` with ``metadata.jsonl``), shared by every recipe."""
    from demo.shapes import write_imagefolder

    write_imagefolder(root, count, 4, seed=0, size=size)
    return root


def write_llm(path: str, captions: list[str], full: bool, device: torch.device) -> str:
    """The stand-in Qwen3 (``demo.llm``) with a word-level chat tokenizer over ``captions``. ``full``: the
    Qwen3-0.6B shape, with filler words padding the tokenizer to Qwen3's length, so adding the K code tokens grows
    the embedding and LM head to the rows the real model gets; else the tests' tiny shape."""
    import transformers

    from demo.llm import standin_llm, word_tokenizer

    tokenizer = word_tokenizer(captions + ["user assistant system"], by_frequency=False,
                               size=QWEN3_TOKENIZER_LEN if full else None)
    tokenizer.save_pretrained(path)
    transformers.utils.logging.disable_progress_bar()  # the "Writing model shards" bar would clutter the report
    # drawn on the device: a 0.6B model initialises in a fraction of the CPU time on a GPU
    if full:
        llm = standin_llm("qwen3", QWEN3_VOCAB, device=device, **QWEN3_0P6B)
    else:
        llm = standin_llm("qwen3", len(tokenizer), device=device, max_position_embeddings=2048)
    llm.to(torch.bfloat16).save_pretrained(path)
    del llm
    return path


# ----------------------------------------------------------------------------- FLOP counting


class EagerEngine(torch.nn.Module):
    """As much of a DeepSpeed engine (a module wrapping ``module``) as ``vqrae.train.train_step`` uses, on one
    process with no optimizer: the step's forward and backward run as in training, and no weight changes
    (``step`` is a no-op, never at an accumulation boundary)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass

    def is_gradient_accumulation_boundary(self) -> bool:
        return False

    def zero_optimization_stage(self) -> int:
        return 0

    def bfloat16_enabled(self) -> bool:
        return False


def tokenizer_flops_per_image(config: str, overrides: list[str], device: torch.device, batch: int = 2) -> float:
    """Matmul and convolution FLOPs per image of one training step as ``scripts/train_tokenizer.py`` takes
    it (``vqrae.train.train_step`` with the GAN on): forward, stage-2 teacher, generator loss with LPIPS and the
    adaptive GAN weight, backward, and the discriminator step. Counted in fp32: the count does not depend on the
    dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    from vqrae import VQRAE
    from vqrae.config import load_config
    from vqrae.losses import PerceptualLoss
    from vqrae.runtime.guard import NonFiniteGuard
    from vqrae.train import TokenizerTrainConfig, build_discriminator, make_teacher, set_stage, train_step

    cfg = load_config(TokenizerTrainConfig, config, overrides)
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")  # random init is intended here
        model = VQRAE.from_pretrained(cfg.init_from) if cfg.stage == 2 else VQRAE(cfg.model)
        model = model.to(device)
        set_stage(model, cfg.stage)
        teacher = make_teacher(model.encoder) if cfg.stage == 2 else None
        loss = cfg.loss
        disc = EagerEngine(build_discriminator(loss)) if loss.gan_weight > 0 else None
        perceptual = PerceptualLoss(loss.lpips_net, loss.lpips_backbone).to(device) if loss.perceptual_weight > 0 else None
        images = torch.rand(batch, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    guard = NonFiniteGuard(1, device)
    with FlopCounterMode(display=False) as counter:
        train_step(EagerEngine(model), disc, images, loss, loss.gan_start_step, "fp32", guard, perceptual, teacher,
                   model.decoder.last_layer.weight)
    return counter.get_total_flops() / batch


def mllm_flops_per_token(config: str, overrides: list[str], device: torch.device) -> float:
    """Matmul FLOPs per non-padding token of one training step of ``scripts/train_mllm.py``, on its first
    micro-batch: LLM forward and backward (and the VQRAE's encoding, when codes are not pre-computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mllm.data import make_loaders, prepare_batch
    from mllm.train import MLLMTrainConfig, build_model, unregister_vqrae
    from vqrae.config import load_config

    cfg = load_config(MLLMTrainConfig, config, overrides + ["data.num_workers=0"])
    model, _ = build_model(cfg)
    vqrae = unregister_vqrae(model)
    if cfg.data.task_ratio == 1.0:
        model.projector.requires_grad_(False)
    loaders = make_loaders(cfg.data, model, cfg.run.micro_batch_size)
    model.to(device)
    vqrae.to(device)
    batch = next(iter(loaders.values())).next()
    tokens = int(batch.attention_mask.sum())
    with FlopCounterMode(display=False) as counter:
        batch = prepare_batch(model, batch, device, cfg.run.precision)
        model(**batch.model_inputs()).loss.backward()
    return counter.get_total_flops() / tokens


# ----------------------------------------------------------------------------- the check


def run_recipe(r: Recipe, result: Result, common: list[str], ladder: list[int], args, work: str, logs: str,
               cuda: bool) -> None:
    script = "scripts/train_tokenizer.py" if r.kind == "tokenizer" else "scripts/train_mllm.py"
    out_dir = os.path.join(work, r.name)
    for mb in ladder:
        shutil.rmtree(out_dir, ignore_errors=True)
        overrides = common + [f"run.output_dir={out_dir}", f"run.batch_size={mb}", f"run.micro_batch_size={mb}"]
        log_path = os.path.join(logs, f"{r.name}_mb{mb}.log")
        print(f"== {r.name}: micro-batch {mb} (log {log_path})", flush=True)
        rc, text, wall, peak = launch(deepspeed_cmd(script, r.config, overrides), log_path, args.timeout, cuda)
        result.wall_s += wall
        if rc != 0 and OOM.search(text) and mb != ladder[-1]:
            print(f"   out of memory at micro-batch {mb} ({wall:.0f} s)", flush=True)
            continue
        result.micro_batch, result.peak_mib, result.overrides = mb, peak, overrides
        if rc != 0 or "done:" not in text:
            result.status = "failed: " + failure(text, rc)
        else:
            key = "img_per_s" if r.kind == "tokenizer" else "tokens_per_s"
            result.rate = steady(logged(text, key))
            result.status = "ok" if result.rate is not None else f"failed: no {key} logged"
        print(f"   {result.status} ({wall:.0f} s)", flush=True)
        # the export stays (the next stage starts from it); the DeepSpeed states, the bulk, do not
        shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
        return


def table(results: list[Result], peak_tflops: Optional[float], header: str) -> str:
    rows = [header, "",
            "| recipe | result | micro-batch | steady speed | peak memory (GiB) | GFLOP per image / token | MFU | wall (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for res in results:
        unit = "img/s" if res.recipe.kind == "tokenizer" else "tokens/s"
        speed = f"{res.rate:.1f} {unit}" if res.rate is not None else "-"
        mem = f"{res.peak_mib / 1024:.2f}" if res.peak_mib is not None else "-"
        gflop = f"{res.flops_per_item / 1e9:.4g}" if res.flops_per_item is not None else "-"
        mfu = "-"
        if res.rate is not None and res.flops_per_item is not None and peak_tflops:
            mfu = f"{100 * res.rate * res.flops_per_item / (peak_tflops * 1e12):.1f}%"
        rows.append(f"| {res.recipe.name} | {res.status} | {res.micro_batch or '-'} | {speed} | {mem} | {gflop} | "
                    f"{mfu} | {res.wall_s:.0f} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="shrunk shapes, 2 steps, on a CPU (or whatever device exists)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per recipe (default 20; --tiny: 2)")
    p.add_argument("--micro-batches", default=None,
                   help="tokenizer micro-batches to try, largest first, until one fits (default 64,32,16; --tiny: 4)")
    p.add_argument("--mllm-micro-batches", default=None,
                   help="the same for the MLLM (default: the recipe's 8, then 4; --tiny: 2)")
    p.add_argument("--images", type=int, default=None,
                   help="procedural training images (default: steps x largest micro-batch, 1280; --tiny: 32)")
    p.add_argument("--precision", choices=["recipe", "bf16", "fp32"], default="recipe",
                   help="run.precision of every run (default: as each recipe ships, bf16)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default on CUDA: 989, H100/H200 dense bf16; on a CPU: no MFU)")
    p.add_argument("--only", default=None, help="comma list of recipe names (their prerequisites run too)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one launch may take before it is killed")
    p.add_argument("--workdir", default=None, help="where data, models and runs go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (exports, data) instead of deleting it")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="directory for recipes_gpu.md and the run logs (default: $OUT when set)")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("error: no CUDA device; on a CPU run the shrunk check with --tiny", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps or (2 if args.tiny else 20)
    ladder = [int(x) for x in (args.micro_batches or ("4" if args.tiny else "64,32,16")).split(",")]
    mllm_ladder = [int(x) for x in (args.mllm_micro_batches or ("2" if args.tiny else "8,4")).split(",")]
    # one epoch covers every run: an epoch boundary restarts the loader's prefetching, a stall inside a window
    num_images = args.images or (32 if args.tiny else max(256, steps * max(ladder + mllm_ladder)))
    peak_tflops = args.peak_tflops or (989.0 if cuda else None)
    work = args.workdir or tempfile.mkdtemp(prefix="vqrae-recipes-")
    os.makedirs(work, exist_ok=True)
    logs = os.path.join(args.out, "recipes_gpu_logs") if args.out else os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)

    wanted = set(args.only.split(",")) if args.only else {r.name for r in RECIPES}
    by_name = {r.name: r for r in RECIPES}
    unknown = wanted - set(by_name)
    if unknown:
        print(f"error: unknown recipe(s) {sorted(unknown)}; valid: {', '.join(by_name)}", file=sys.stderr)
        return 2
    for name in list(wanted):  # prerequisites
        while by_name[name].needs:
            name = by_name[name].needs
            wanted.add(name)
    recipes = [r for r in RECIPES if r.name in wanted]

    start = time.time()
    if cuda:
        what = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        what = f"CPU ({os.cpu_count()} cores)"
    mode = "tiny (shrunk shapes)" if args.tiny else "full shape"
    header = (f"Recipe check, {mode}: {what}; torch {torch.__version__}; {steps} steps per recipe, batch = micro-batch, "
              f"GAN from step 0, random init, {num_images} procedural images; precision {args.precision}; "
              f"MFU against {peak_tflops or '-'} TFLOP/s; {time.strftime('%Y-%m-%d')}.")
    print(header, flush=True)
    size = 32 if args.tiny else 256
    data = write_images(os.path.join(work, "data"), num_images, size)

    log_every = max(1, steps // 4)
    base = [f"run.steps={steps}", f"run.log_every={log_every}", f"run.save_every={steps}", "run.progress_bar=false"]
    if args.precision != "recipe":
        base.append(f"run.precision={args.precision}")
    if args.tiny:
        base.append("data.num_workers=0")  # worker processes would only compete for a small machine's cores
    tok_common = base + ["model.encoder.pretrained=false", "loss.lpips_backbone=random", "loss.gan_start_step=0",
                         f"data.source={data}", "data.split=train"]
    if args.tiny:
        tok_common += ["data.resolution=32", "loss.disc_channels=8", "loss.disc_layers=2"]

    results = {r.name: Result(r) for r in recipes}
    for r in recipes:
        res = results[r.name]
        dep = results.get(r.needs) if r.needs else None
        if dep is not None and not dep.ok:
            res.status = f"skipped: {r.needs} failed"
            continue
        if r.kind == "tokenizer":
            common = list(tok_common)
            if args.tiny:  # a stage 2 has the shape of its stage 1
                common += by_name[r.needs].tiny if r.needs else r.tiny
            if dep is not None:
                common = common + [f"init_from={os.path.join(work, r.needs, 'model')}"]
            # stage 2 needs more memory than stage 1 (the encoder trains): start where stage 1 fitted
            rungs = [mb for mb in ladder if dep is None or mb <= (dep.micro_batch or mb)]
            run_recipe(r, res, common, rungs, args, work, logs, cuda)
            continue
        common = prepare_mllm(res, base, data, dep, work, logs, args, cuda, device)
        if common is not None:
            run_recipe(r, res, common, mllm_ladder, args, work, logs, cuda)

    print("== counting FLOPs of one step per recipe", flush=True)
    for res in results.values():
        if not res.ok:
            continue
        try:
            if res.recipe.kind == "tokenizer":
                res.flops_per_item = tokenizer_flops_per_image(res.recipe.config, res.overrides, device)
            else:
                res.flops_per_item = mllm_flops_per_token(res.recipe.config, res.overrides, device)
        except Exception as e:  # a counting failure leaves the measured speed standing
            print(f"   {res.recipe.name}: FLOPs not counted: {type(e).__name__}: {e}", flush=True)
        if cuda:
            torch.cuda.empty_cache()

    report = table(list(results.values()), peak_tflops, header)
    report += f"\nTotal wall time {time.time() - start:.0f} s. Logs: {logs}\n"
    failed = [res.recipe.name for res in results.values() if not res.ok]
    report += f"FAILED: {', '.join(failed)}\n" if failed else "All recipes trained.\n"
    print("\n" + report)
    if args.out:
        with open(os.path.join(args.out, "recipes_gpu.md"), "w") as f:
            f.write(report)
    if not args.keep and not args.workdir:
        for name in os.listdir(work):
            if os.path.join(work, name) != logs:
                shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    return 1 if failed else 0


def prepare_mllm(res: Result, base: list[str], data: str, dep: Result, work: str, logs: str, args, cuda: bool,
                 device: torch.device) -> Optional[list[str]]:
    """The LLM directory and the codes of the data (``scripts/tokenize_dataset.py``); the MLLM's overrides."""
    vqrae = os.path.join(work, dep.recipe.name, "model")
    llm = os.path.join(work, "llm")
    t0 = time.time()
    with open(os.path.join(data, "train", "metadata.jsonl")) as f:
        captions = [json.loads(line)["caption"] for line in f]
    try:
        write_llm(llm, captions, not args.tiny, device)
    except Exception as e:
        res.status, res.wall_s = f"failed: writing the LLM: {type(e).__name__}: {e}"[:200], time.time() - t0
        return None
    if cuda:
        torch.cuda.empty_cache()
    res.wall_s += time.time() - t0
    codes = os.path.join(work, "codes")
    # the trainer's compute dtype, so the stored codes are the ones it would compute on the fly
    precision = args.precision
    if precision == "recipe":
        from mllm.train import MLLMTrainConfig
        from vqrae.config import load_config

        precision = load_config(MLLMTrainConfig, res.recipe.config).run.precision
    cmd = [sys.executable, "scripts/tokenize_dataset.py", "--vqrae", vqrae, "--data", data, "--out", codes,
           "--dtype", "bfloat16" if precision == "bf16" else "float32", "--device", device.type]
    log_path = os.path.join(logs, "tokenize_dataset.log")
    print(f"== tokenize_dataset for {res.recipe.name} (log {log_path})", flush=True)
    rc, text, wall, _ = launch(cmd, log_path, args.timeout, cuda)
    res.wall_s += wall
    if rc != 0:
        res.status = "failed: tokenize_dataset: " + failure(text, rc)
        return None
    return base + [f"model.llm={llm}", f"model.vqrae={vqrae}", f"data.generation.source={data}",
                   f"data.generation.codes_from={codes}"]


if __name__ == "__main__":
    sys.exit(main())
