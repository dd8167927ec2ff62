"""Self-distillation study: stage 2 with and without the distillation loss, then the same MLLM on each.

Claim under test (VQRAE paper, Table 6): unfreezing the encoder in stage 2 without self-distillation destroys
understanding (MME-P 609), with it (lambda_d = 1) understanding is kept (1439) while reconstruction improves.

From one stage-1 export (trained here with ``configs/tokenizer/demo_stage1.yaml`` unless ``--stage1`` exists),
for each seed and each lambda_d in ``--weights``, the script runs the demo's command-line entry points:

1. stage 2 (``configs/tokenizer/demo_stage2.yaml``, ``loss.distill_weight=lambda_d``), the same steps and the
   same encoder lr (``--encoder-lr``, 100x the demo's 1e-4, so that the encoder moves far enough to lose what it
   knew; at 1e-3 it barely moves) for every lambda_d;
2. the demo MLLM (``configs/mllm/demo.yaml``) on that tokenizer, the same LLM start and steps for every run;
3. ``scripts/score_demo.py`` on the held-out split: answer accuracy, generation scores, PSNR.

The seed (``run.seed`` and ``data.seed``) changes stage 2's and the MLLM's batches and initial draws. Then, on
the 400 held-out test images, for the stage-1 export and every stage-2 export: the encoder's feature drift (mean
cosine distance of patch tokens to the stage-1 encoder, which is the frozen teacher E0), reconstruction PSNR,
and a linear probe of each picture attribute from pooled tokens (trained on 2000 training images) as a direct
read of what the features still carry. Every step is skipped when its output exists, so an interrupted run
resumes. Writes ``<out>/results.json``, the markdown table on stdout and a plot.

    python scripts/experiments/distill_study.py                 # CPU default: reduced steps, 3 seeds (~40 min, 1 core)
    python scripts/experiments/distill_study.py --scale paper --device cuda --seeds 0,1,2   # the demo's full steps
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Reduced steps (CPU default) and the demo's own (paper): stage 1, stage 2, MLLM steps; prompts, question images.
SCALES = {
    "cpu": dict(stage1_steps=1000, stage2_steps=150, mllm_steps=700, prompts=32, question_images=40),
    "paper": dict(stage1_steps=1000, stage2_steps=1000, mllm_steps=1800, prompts=64, question_images=80),
}
PAPER = {0.0: dict(mme_p=609), 1.0: dict(mme_p=1439)}  # Table 6 (MME-P; the paper's lambda_d = 1 run)
ATTRS = ("shape", "colour", "size", "position", "background")


def sh(cmd: list, log: str) -> None:
    """Run one command (pinned like this process), appending its output to ``log``; stop on failure."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    print(f"  [{time.time() - t0:.0f}s] {' '.join(cmd[:8])}{' ...' if len(cmd) > 8 else ''} -> rc {rc}", flush=True)
    if rc:
        raise SystemExit(f"error: command failed (rc {rc}); see {log}")


def deepspeed(script: str, config: str, overrides: list, port: int) -> list:
    return ["deepspeed", "--num_gpus", "1", "--master_port", str(port), script, "--config", config, *overrides]


QUIET = ["run.image_every=0", "run.progress_bar=false", "run.tensorboard=false"]


def pipeline(args) -> dict:
    """Run every missing step; returns {(seed, weight): run directory}."""
    log = os.path.join(args.out, "commands.log")
    py = sys.executable
    if not os.path.isfile(os.path.join(args.data, "test", "metadata.jsonl")):
        sh([py, "scripts/make_demo_data.py", "--out", args.data], log)
    if not os.path.isfile("outputs/demo/vfm/model.safetensors"):  # the path the demo tokenizer config loads
        sh([py, "scripts/train_standin_vfm.py"], log)
    if not os.path.isfile(os.path.join(args.llm, "config.json")):
        sh([py, "scripts/make_demo_llm.py", "--out", args.llm], log)
    if not os.path.isfile(os.path.join(args.stage1, "config.yaml")):
        out_dir = os.path.dirname(args.stage1.rstrip("/"))
        sh(deepspeed("scripts/train_tokenizer.py", "configs/tokenizer/demo_stage1.yaml", [
            f"run.output_dir={out_dir}", f"run.steps={args.stage1_steps}", f"run.save_every={args.stage1_steps}",
            "run.log_every=100", f"data.source={args.data}", *QUIET], args.port), log)
    runs = {}
    for seed in args.seeds:
        for w in args.weights:
            d = os.path.join(args.out, f"seed{seed}_distill{w:g}")
            runs[(seed, w)] = d
            seeds = [f"run.seed={seed}", f"data.seed={seed}"]
            if not os.path.isfile(os.path.join(d, "tokenizer", "model", "config.yaml")):
                sh(deepspeed("scripts/train_tokenizer.py", "configs/tokenizer/demo_stage2.yaml", [
                    f"init_from={args.stage1}", f"run.output_dir={d}/tokenizer", f"loss.distill_weight={w}",
                    f"encoder_lr={args.encoder_lr}", f"run.steps={args.stage2_steps}", f"run.save_every={args.stage2_steps}",
                    "run.log_every=50", f"data.source={args.data}", *seeds, *QUIET], args.port), log)
            mllm_model = os.path.join(d, "mllm", "model")
            if not (os.path.isdir(mllm_model) and os.listdir(mllm_model)):
                sh(deepspeed("scripts/train_mllm.py", "configs/mllm/demo.yaml", [
                    f"model.vqrae={d}/tokenizer/model", f"model.llm={args.llm}", f"run.output_dir={d}/mllm",
                    f"run.steps={args.mllm_steps}", f"run.save_every={args.mllm_steps}", "run.log_every=100",
                    f"optim.warmup_steps={min(50, max(1, args.mllm_steps // 24))}", *seeds,
                    "run.progress_bar=false", "run.tensorboard=false"], args.port), log)
            if not os.path.isfile(os.path.join(d, "score.json")):
                sh([py, "scripts/score_demo.py", "--model", f"{d}/mllm/model", "--data", args.data, "--out",
                    f"{d}/score.json", "--grid-dir", d, "--prompts", str(args.prompts),
                    "--question-images", str(args.question_images)], log)
    return runs


# -- measurements on the tokenizers themselves ----------------------------------------------------------------
def load_split(data: str, split: str, limit: int | None = None):
    from PIL import Image

    rows = [json.loads(line) for line in open(os.path.join(data, split, "metadata.jsonl"))][:limit]
    imgs = np.stack([np.asarray(Image.open(os.path.join(data, split, r["file_name"])).convert("RGB")) for r in rows])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0), rows


@torch.no_grad()
def features_and_recon(path: str, images: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    from vqrae.model import VQRAE

    model = VQRAE.from_pretrained(path).to(device).eval()
    feats, recon = [], []
    for b in images.split(100):
        out = model(b.to(device))
        feats.append(out.features.cpu())
        recon.append(out.reconstruction.clamp(-1, 1).cpu())
    return torch.cat(feats), torch.cat(recon)


def psnr(recon: torch.Tensor, images: torch.Tensor) -> float:
    """Mean per-image PSNR on [0, 1] images."""
    mse = ((recon - images) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def probe(train_x: torch.Tensor, train_rows: list, test_x: torch.Tensor, test_rows: list) -> dict:
    """Held-out accuracy of a linear (softmax) probe per attribute on [mean, max]-pooled tokens."""
    def pool(f):
        return torch.cat([f.mean(1), f.amax(1)], -1)

    a, b = pool(train_x), pool(test_x)
    mu, sd = a.mean(0), a.std(0).clamp_min(1e-6)
    a, b = (a - mu) / sd, (b - mu) / sd
    out = {}
    for attr in ATTRS:
        names = sorted({r[attr] for r in train_rows})
        y = torch.tensor([names.index(r[attr]) for r in train_rows])
        yt = torch.tensor([names.index(r[attr]) if r[attr] in names else -1 for r in test_rows])
        torch.manual_seed(0)
        lin = torch.nn.Linear(a.shape[1], len(names))
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(lin(a), y) + 1e-3 * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        out[attr] = float((lin(b).argmax(-1) == yt).float().mean())
    out["mean"] = float(np.mean([out[k] for k in ATTRS]))
    return out


def measure(args, runs: dict) -> dict:
    device = torch.device(args.device)
    test, test_rows = load_split(args.data, "test")
    train, train_rows = load_split(args.data, "train", 2000)
    teacher_test, rec0 = features_and_recon(args.stage1, test, device)
    teacher_train, _ = features_and_recon(args.stage1, train, device)
    result = {"stage1": {"psnr": psnr(rec0, test), "probe": probe(teacher_train, train_rows, teacher_test, test_rows)}}
    for (seed, w), d in runs.items():
        path = os.path.join(d, "tokenizer", "model")
        ft, rec = features_and_recon(path, test, device)
        ftr, _ = features_and_recon(path, train, device)
        score = json.load(open(os.path.join(d, "score.json")))
        result[f"{seed}:{w:g}"] = {
            "seed": seed, "distill_weight": w,
            "drift": float((1 - F.cosine_similarity(ft, teacher_test, dim=-1)).mean()),
            "psnr": psnr(rec, test), "probe": probe(ftr, train_rows, ft, test_rows),
            "accuracy": score["understanding"]["accuracy"], "understanding": score["understanding"],
            "generation": score["generation"], "score_psnr": score["tokenizer"]["psnr"],
            "codebook_use_pct": score["tokenizer"]["codebook_usage_pct"],
        }
    return result


def report(res: dict, args) -> str:
    s1 = res["stage1"]
    runs = [v for k, v in res.items() if k != "stage1"]
    lines = ["| lambda_d | seed | answer acc. % | generation all-match % | colour / shape match % | PSNR dB (stage 1: "
             f"{s1['psnr']:.2f}) | feature drift (1 - cos) | linear-probe acc. % (stage 1: {100 * s1['probe']['mean']:.1f}) "
             "| code use % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["distill_weight"], r["seed"])):
        g = r["generation"]
        lines.append(f"| {r['distill_weight']:g} | {r['seed']} | {100 * r['accuracy']:.1f} | {100 * g['all']:.1f} "
                     f"| {100 * g['colour']:.0f} / {100 * g['shape']:.0f} | {r['psnr']:.2f} | {r['drift']:.4f} "
                     f"| {100 * r['probe']['mean']:.1f} | {r['codebook_use_pct']:.1f} |")
    lines += ["", "| lambda_d | answer acc. % (mean +- sd over seeds) | generation all-match % | PSNR dB | drift | probe % | paper MME-P |",
              "|---|---|---|---|---|---|---|"]
    for w in args.weights:
        rs = [r for r in runs if r["distill_weight"] == w]

        def ms(f, scale=1.0, fmt=".1f"):
            v = np.array([f(r) for r in rs]) * scale
            return f"{v.mean():{fmt}} +- {v.std(ddof=1) if len(v) > 1 else 0:{fmt}}"

        lines.append(f"| {w:g} | {ms(lambda r: r['accuracy'], 100)} | {ms(lambda r: r['generation']['all'], 100)} "
                     f"| {ms(lambda r: r['psnr'], 1, '.2f')} | {ms(lambda r: r['drift'], 1, '.4f')} "
                     f"| {ms(lambda r: r['probe']['mean'], 100)} | {PAPER.get(w, {}).get('mme_p', '-')} |")
    return "\n".join(lines)


def plot(res: dict, args, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    runs = [v for k, v in res.items() if k != "stage1"]
    panels = [("answer accuracy %", lambda r: 100 * r["accuracy"], None),
              ("generation all-match %", lambda r: 100 * r["generation"]["all"], None),
              ("reconstruction PSNR dB", lambda r: r["psnr"], res["stage1"]["psnr"]),
              ("feature drift 1 - cos", lambda r: r["drift"], 0.0),
              ("linear-probe accuracy %", lambda r: 100 * r["probe"]["mean"], 100 * res["stage1"]["probe"]["mean"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, f, ref) in zip(axes, panels):
        for i, w in enumerate(args.weights):
            vals = [f(r) for r in runs if r["distill_weight"] == w]
            ax.bar(i, np.mean(vals), color="C1" if w == 0 else "C0", alpha=0.6)
            ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
        if ref is not None:
            ax.axhline(ref, color="gray", ls="--", lw=1, label="stage 1")
            ax.legend(fontsize=7)
        if "PSNR" in title:  # differences of a few tenths of a dB: zoom in
            vals = [f(r) for r in runs] + [ref]
            ax.set_ylim(min(vals) - 0.3, max(vals) + 0.3)
        ax.set_xticks(range(len(args.weights)), [f"lambda_d={w:g}" for w in args.weights])
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"stage 2 with / without self-distillation, {len(args.seeds)} seeds (dots)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot written to {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="step counts: reduced (cpu) or the demo's own")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--weights", default="0,1", help="lambda_d values")
    p.add_argument("--encoder-lr", type=float, default=1e-2, help="stage-2 encoder lr, the same for every lambda_d")
    for k in SCALES["cpu"]:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None, help="overrides --scale")
    p.add_argument("--stage1", default="outputs/distill_study/stage1/model", help="stage-1 export (trained if missing)")
    p.add_argument("--llm", default="outputs/demo/llm")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--out", default=None, help="default outputs/distill_study/encoder_lr_<lr>")
    p.add_argument("--plot", default=None, help="PNG (default <out>/distill.png)")
    p.add_argument("--port", type=int, default=29612, help="DeepSpeed master port")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the drift/probe pass")
    args = p.parse_args(argv)
    for k, v in SCALES[args.scale].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or f"outputs/distill_study/encoder_lr_{args.encoder_lr:g}"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.weights = [float(w) for w in args.weights.split(",")]
    os.chdir(ROOT)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    runs = pipeline(args)
    settings = {k: v for k, v in vars(args).items() if k != "plot"}
    path = os.path.join(args.out, "results.json")
    res = json.load(open(path)) if os.path.isfile(path) else {}
    if res.pop("settings", None) != settings:  # measured already for these settings: only the report is redone
        res = measure(args, runs)
        with open(path, "w") as f:
            json.dump({**res, "settings": settings}, f, indent=1)
    print(f"\n{time.time() - t0:.0f}s; settings: {settings}\n")
    print(report(res, args))
    plot(res, args, args.plot or os.path.join(args.out, "distill.png"))


if __name__ == "__main__":
    main()
