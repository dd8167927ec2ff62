"""Codebook study: SimVQ against a plain learned codebook, trained alone on a trained encoder's patch tokens.

Claim under test (VQRAE paper, Table 5): quantizing semantic encoder features, SimVQ's codebook use rises
with the codebook dimension e and reaches ~100 % at e = 1536 (K = 16384), while a plain learned codebook
collapses.

Features. Patch tokens (D = 96, 36 per image) of the demo's *trained* stand-in encoder
(``scripts/train_standin_vfm.py``, loaded with the demo tokenizer config's encoder section) over procedural
48 px images richer than the shapes data set, whose 1728 distinct pictures are ~90 % plain background and could
never fill 16384 codes: a colour gradient, one or two sinusoidal gratings, and one to three ``demo.shapes``
shapes pasted at random offsets. Training and held-out tokens come from different images. Cached in
``<out>/features.pt``.

Training. No decoder: the quantizer (``vqrae.quantizer.SimVQ`` or ``VectorQuantizer``, calibrated with the
training tokens' per-channel mean and std as the tokenizer does) is trained on the frozen tokens with

    loss = ||proj_out(q_st) - x~||^2 + 1.0 ||sg(c) - z||^2 + 0.25 ||c - sg(z)||^2,   z = proj_in(x~)

(x~ the standardised token; commitment 1, codebook 0.25 = ``LossConfig``), AdamW with the paper's quantizer
schedule (peak 4e-4, cosine to 1e-4, betas 0.9/0.999, weight decay 1e-4 on matrices, gradient clip 1), a
linear warmup over the first 5 % of the steps. Both kinds start from the same seed (same projections, same
initial effective codebook) and see the same batches. The step is the module's own math (checked against
``SimVQ.forward`` at start-up: same losses, same gradients) with two exact shortcuts that make e = 1536 affordable on
a CPU: the effective codebook C = C'W^T is formed without autograd (only the gathered codes carry gradient),
and when e > D the nearest-code search runs in the (D+1)-dim subspace that holds every z = proj_in(x~).

Hypothesis runs (``--variants``, each one run at one (K, e) cell): ``w_lr=<x>`` scales W's lr, ``w_opt=sgd``
trains W with SGD (momentum 0.9) at that lr, ``p_lr=<x>`` scales the input projection's lr (0 freezes it),
``w_init=linear`` replaces the identity W by nn.Linear's default
init with a bias (the SimVQ reference), ``init=matched`` and ``init=kmeans`` start the codebook with the package's
``quantizer.init`` of that name (``init_codebook_matched``: W set so that the codes have the latents' mean and
covariance; ``init_codebook_kmeans``: k-means centroids), fitted to the first ``--init-tokens`` training tokens
as ``calibrate_quantizer`` does, ``standardise=0`` skips the feature standardisation, ``z_scale=1``
rescales proj_in at init so that ||z|| matches ||c|| (rather than sqrt(e/3) times larger), ``rank=full`` lifts
the tokens to full rank e with a fixed random nonlinear map before proj_in. Options combine with '+'.
(``w_init=matched_v0`` rows in an old ``cells.jsonl`` come from an earlier, study-only form of ``init=matched``:
a W with a bias, fitted to the population covariance of C'.)

Outputs: ``<out>/cells.jsonl`` (one line per finished run, rerunning skips finished ones), ``<out>/curves.png``
and the markdown table on stdout.

    python scripts/experiments/codebook_study.py          # CPU default: K=4096 grid at e<=768, identity against
                                                          # matched starts at both K; ~10 min on one core
    python scripts/experiments/codebook_study.py --full   # both K, e up to 1536, every hypothesis run and the
                                                          # k-means reference: ~2 CPU-hours on one core
    python scripts/experiments/codebook_study.py --device cuda --steps 20000 --batch 16384 --train-images 65536 \\
        --heldout 262144 --out outputs/codebook_study_cuda                # paper-scale schedule on one GPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from demo.shapes import BACKGROUNDS, render, sample_attrs  # noqa: E402
from vqrae.encoder import EncoderConfig, VFMEncoder  # noqa: E402
from vqrae.losses import LossConfig  # noqa: E402
from vqrae.metrics import CodebookUsage  # noqa: E402
from vqrae.quantizer import SimVQ, VectorQuantizer, nearest_code  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUANTIZERS = {"SimVQ": SimVQ, "VQ": VectorQuantizer}
IMAGE_SIZE, RENDER_SIZE = 48, 60
# The paper's Table 5 (SimVQ use %, SigLIP2 features): K = 16384 over e; e = 1536 over K.
PAPER_E = {384: 64, 768: 69, 1152: 83, 1536: 100, 1920: 98}
PAPER_K = {4096: 100, 8192: 100, 16384: 100, 32768: 96}
# The default's runs beside its grid: the package's matched start against the identity start at two e and both K.
STARTS = "4096:256:SimVQ:init=matched;4096:768:SimVQ:init=matched;16384:256:SimVQ:base;16384:256:SimVQ:init=matched"
# The hypothesis runs of docs/codebook_study.md (--full): one option changed per run at K=4096, e=256, the k-means
# start (its k-means++ seeding alone takes ~15 min on one core), and the matched start at the paper's cell.
MECHANISM = ";".join(["4096:256:SimVQ:" + v for v in (
    "w_lr=0", "w_lr=0.1", "w_lr=0.01", "w_opt=sgd+w_lr=1000", "w_init=linear", "standardise=0", "z_scale=1",
    "rank=full", "p_lr=0", "p_lr=0.1", "init=kmeans")] + ["4096:256:VQ:p_lr=0", STARTS, "16384:1536:SimVQ:init=matched"])
FULL = dict(dims="64,256,768,1536", sizes="4096,16384", variants="mechanism", kmeans_tokens=65536)
QUICK = dict(dims="64,256,768", sizes="4096", variants="starts", kmeans_tokens=0)


# -- features -------------------------------------------------------------------------------------------------
def procedural_images(n: int, seed: int) -> torch.Tensor:
    """n images (n, 3, 48, 48) in [-1, 1]: a colour gradient with one or two sinusoidal gratings, and one to
    three shapes from ``demo.shapes`` pasted on top (each from a 60 px render, shifted by up to 12 px)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(n):
        c0, c1, angle = rng.random(3), rng.random(3), rng.random() * 2 * np.pi
        t = np.cos(angle) * xx + np.sin(angle) * yy
        img = c0 + (c1 - c0) * ((t - t.min()) / np.ptp(t))[..., None]
        for _ in range(rng.integers(1, 3)):
            freq, angle, phase = rng.uniform(1, 8), rng.random() * 2 * np.pi, rng.random() * 2 * np.pi
            wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
            img = img + rng.uniform(0.05, 0.3) * wave[..., None] * (2 * rng.random(3) - 1)
        img = np.clip(img, 0.0, 1.0) * 255
        for _ in range(rng.integers(1, 4)):
            attrs = sample_attrs(pick, "any")
            x, y = rng.integers(0, RENDER_SIZE - IMAGE_SIZE + 1, 2)
            shape = np.asarray(render(attrs, RENDER_SIZE))[y : y + IMAGE_SIZE, x : x + IMAGE_SIZE]
            mask = np.any(shape != np.array(BACKGROUNDS[attrs.background]), axis=-1)
            img[mask] = shape[mask]
        out[i] = img.astype(np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_encoder(config: str) -> VFMEncoder:
    """The demo tokenizer's encoder (the trained stand-in) from the ``model.encoder`` section of ``config``."""
    with open(os.path.join(ROOT, config)) as f:
        enc = yaml.safe_load(f)["model"]["encoder"]
    if enc.get("weights") and not os.path.isabs(enc["weights"]):
        enc["weights"] = os.path.join(ROOT, enc["weights"])
    if enc.get("weights") and not os.path.isfile(enc["weights"]):
        raise SystemExit(f"error: no trained encoder at {enc['weights']}; run python scripts/train_standin_vfm.py first")
    return VFMEncoder(EncoderConfig(**enc)).eval()


@torch.no_grad()
def encoder_features(args) -> dict:
    """{"train": (N, D), "heldout": (M, D), "participation": ...}: stand-in encoder tokens, cached on disk."""
    path = os.path.join(args.out, "features.pt")
    key = dict(config=args.encoder_config, train_images=args.train_images, heldout=args.heldout, seed=args.seed)
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        if cached["key"] == key:
            return cached
    vit = load_encoder(args.encoder_config)
    per_image = vit.grid_size**2

    def encode(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([vit(b).reshape(-1, vit.dim) for b in images.split(256)])

    train = encode(procedural_images(args.train_images, args.seed))
    heldout = encode(procedural_images(-(-args.heldout // per_image), args.seed + 1))[: args.heldout]
    out = dict(key=key, train=train, heldout=heldout, participation=participation(train))
    os.makedirs(args.out, exist_ok=True)
    torch.save(out, path)
    return out


def participation(x: torch.Tensor) -> float:
    """Effective dimension (sum l)^2 / sum l^2 of the covariance spectrum of the standardised rows of x."""
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    ev = torch.linalg.eigvalsh(x.T.double() @ x.double() / x.shape[0]).clamp_min(0)
    return float(ev.sum() ** 2 / ev.pow(2).sum())


# -- one training run -----------------------------------------------------------------------------------------
def parse_variant(text: str) -> dict:
    """'w_lr=0.01+w_init=linear' -> {'w_lr': 0.01, 'w_init': 'linear'}; 'base' -> {}."""
    out = {}
    for part in filter(None, text.split("+")):
        if part == "base":
            continue
        k, _, v = part.partition("=")
        if k not in ("w_lr", "w_opt", "w_init", "init", "standardise", "z_scale", "rank", "p_lr"):
            raise SystemExit(f"error: unknown variant option '{k}'")
        if (k, v) == ("w_init", "matched"):
            raise SystemExit("error: w_init=matched is now init=matched (the package's init_codebook_matched)")
        if k == "init" and v not in ("matched", "kmeans"):
            raise SystemExit(f"error: init must be matched or kmeans, got '{v}'")
        out[k] = float(v) if k in ("w_lr", "p_lr") else v
    return out


class Lift(nn.Module):
    """Fixed random full-rank lift of standardised tokens D -> e (rank=full): x~ -> [x~, tanh(R x~)], so
    z = proj_in(lift(x)) spans all e dimensions rather than the D+1 an affine map of D-dim tokens can reach."""

    def __init__(self, dim: int, out: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("r", torch.randn(out - dim, dim) * 2.0 / dim**0.5)
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x):
        x = (x - self.mean) / self.std
        return torch.cat([x, torch.tanh(x @ self.r.T)], -1)


def build(kind: str, k: int, e: int, train: torch.Tensor, variant: dict, seed: int, init_tokens: int = 65536):
    """The quantizer for one run, with the variant applied; returns (quantizer, lift or None)."""
    torch.manual_seed(seed)  # the same projections and starting codebook for every kind and variant
    dim, mean, std = train.shape[1], train.mean(0), train.std(0)
    lift = None
    if variant.get("rank") == "full" and e > dim:
        lift = Lift(dim, e, mean, std)
        with torch.no_grad():
            lifted = lift(train[:65536])
        mean, std = lifted.mean(0), lifted.std(0)
    q = QUANTIZERS[kind](dim if lift is None else e, k, e, search_chunk=4096, token_chunk=16384)
    if lift is not None:  # SimVQ(e, k, e) has identity projections: give it the same kind as every other run
        q.proj_in, q.proj_out = nn.Linear(e, e), nn.Linear(e, dim)
    if variant.get("standardise", "1") == "1":
        q.calibrate(mean, std)
    if variant.get("w_init") == "linear" and kind == "SimVQ":
        q.codebook_transform = nn.Linear(e, e)  # nn.Linear's default (Kaiming-uniform) init, with a bias
    if variant.get("init"):  # the package's quantizer.init, on the first training tokens as calibrate_quantizer does
        with torch.no_grad():
            sample = lift(train[:init_tokens]) if lift is not None else train[:init_tokens]
        if variant["init"] == "matched":
            q.init_codebook_matched(sample)
        else:
            q.init_codebook_kmeans(sample, generator=torch.Generator().manual_seed(seed))
    if variant.get("z_scale") == "1":
        with torch.no_grad():  # ||z|| ~ sqrt(e/3) ||c|| at init; shrink proj_in so that they match (||c|| ~ 1)
            z = q.project(lift(train[:4096]) if lift is not None else train[:4096])
            q.proj_in.weight.div_(z.norm(dim=-1).mean())
            q.proj_in.bias.zero_()
    return q, lift


def codes_with_grad(q, idx: torch.Tensor) -> torch.Tensor:
    """The codes of ``idx`` with autograd to what learns the codebook (W for SimVQ, the table for VQ)."""
    if isinstance(q, VectorQuantizer):
        return F.embedding(idx, q.embedding)
    return q.codebook_transform(q.base_codebook[idx])  # = F.embedding(idx, C'W^T), gradient to W only


@torch.no_grad()
def search(q, z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code of each z (M, e), exactly as ``nearest_code(z, codebook)`` would find it. When every z lies in
    the span U of proj_in's columns and bias (rank r < e), ||z - c||^2 = ||c||^2 - 2 (U^T z).(U^T c) + const:
    searched as nearest_code([U^T z, 0], [U^T c, sqrt(||c||^2 - ||U^T c||^2)]) at r+1 dims instead of e."""
    lin = q.proj_in
    if isinstance(lin, nn.Identity) or lin.weight.shape[1] + 1 >= z.shape[1] // 2:
        return nearest_code(z, codebook, q.search_chunk, q.token_chunk)
    u, _ = torch.linalg.qr(torch.cat([lin.weight, lin.bias[:, None]], 1))  # (e, r)
    cu = codebook @ u
    rest = (codebook.pow(2).sum(1) - cu.pow(2).sum(1)).clamp_min(0).sqrt()
    zu = z @ u
    return nearest_code(torch.cat([zu, torch.zeros_like(zu[:, :1])], 1), torch.cat([cu, rest[:, None]], 1),
                        q.search_chunk, q.token_chunk)


def losses(q, lift, x: torch.Tensor, target: torch.Tensor) -> dict:
    """SimVQ.forward's losses and indices for tokens x (M, D), plus the reconstruction of ``target``."""
    z = q.project(lift(x) if lift is not None else x)  # (M, e)
    with torch.no_grad():
        idx = search(q, z, q.codebook)
    c = codes_with_grad(q, idx)
    q_st = z + (c - z).detach()
    return dict(indices=idx, z=z, codes=c, recon=F.mse_loss(q.proj_out(q_st), target),
                codebook=F.mse_loss(c, z.detach()), commit=F.mse_loss(z, c.detach()))


def check_step_matches_module() -> None:
    """The study's step equals the package module's forward: same indices, losses and gradients."""
    for kind in QUANTIZERS:
        torch.manual_seed(0)
        q = QUANTIZERS[kind](16, 512, 96)
        x = torch.randn(300, 16) * 3 + 1
        q.calibrate(x.mean(0), x.std(0))
        ref = q(x[None])
        g_ref = torch.autograd.grad(ref.codebook_loss + ref.commit_loss + ref.quantized.sum(), list(q.parameters()))
        mine = losses(q, None, x, x)
        qo = q.proj_out(mine["z"] + (mine["codes"] - mine["z"]).detach())
        g = torch.autograd.grad(mine["codebook"] + mine["commit"] + qo.sum(), list(q.parameters()))
        assert torch.equal(mine["indices"], ref.indices[0]), kind
        assert torch.allclose(mine["codebook"], ref.codebook_loss) and torch.allclose(mine["commit"], ref.commit_loss)
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g, g_ref)), kind


def lr_at(step: int, steps: int, peak: float, floor: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def measure(q, lift, heldout: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, k: int) -> dict:
    """Use % and perplexity of the held-out code histogram, reconstruction error as the fraction of the
    standardised tokens' variance unexplained, and the relative quantisation error ||z - c||^2 / ||z||^2."""
    usage = CodebookUsage(k, window=1)
    counts = torch.zeros(k, dtype=torch.long)
    sq = var = qe = zsq = zn = cn = 0.0
    for x in heldout.split(16384):
        t = (x - mean) / std
        out = losses(q, lift, x, t)
        counts += usage.counts(out["indices"])
        sq += F.mse_loss(q.proj_out(out["codes"]), t, reduction="sum").item()
        var += t.pow(2).sum().item()
        qe += (out["codes"] - out["z"]).pow(2).sum().item()
        zsq += out["z"].pow(2).sum().item()
        zn += out["z"].norm(dim=-1).sum().item()
        cn += out["codes"].norm(dim=-1).sum().item()
    usage.add(counts)
    return {"use_pct": 100 * usage.usage(), "perplexity": usage.perplexity(), "fvu": sq / var, "qerr": qe / zsq,
            "z_over_c": zn / max(cn, 1e-12)}


@torch.no_grad()
def code_geometry(q, heldout: torch.Tensor, lift) -> dict:
    """Effective dimension of the code cloud and of the latents, and the share of the codes' energy inside
    the latents' span (2048 codes)."""
    c = q.codebook[:2048]
    z = q.project(lift(heldout[:4096]) if lift is not None else heldout[:4096])

    def pr(m):
        m = m - m.mean(0)
        ev = torch.linalg.svdvals(m.double()).pow(2)
        return float(ev.sum() ** 2 / ev.pow(2).sum())

    u, s, _ = torch.linalg.svd(z.T, full_matrices=False)  # columns of u: the latents' span
    u = u[:, : int((s > s[0] * 1e-4).sum())]
    inside = float((c @ u).pow(2).sum() / c.pow(2).sum())
    return {"code_dim": pr(c), "latent_dim": pr(z), "code_energy_in_latent_span": inside}


@torch.no_grad()
def w_change(q, w0) -> dict:
    """How W has moved from its start: ||W - W0||_F / ||W0||_F, the share sigma_1^2 / ||W - W0||_F^2 of its top
    singular direction (1 = a rank-1 change), and the effective dimension of (1024 of) the effective codes."""
    c = q.codebook[:1024].double()
    c = c - c.mean(0)
    ev = torch.linalg.eigvalsh(c @ c.T).clamp_min(0)
    out = {"code_dim": float(ev.sum() ** 2 / ev.pow(2).sum())}
    if w0 is not None:
        d = (q.codebook_transform.weight - w0).double()
        v = torch.randn(d.shape[1], 1, dtype=d.dtype, generator=torch.Generator().manual_seed(0)).to(d.device)
        for _ in range(30):  # power iteration on d^T d
            v = d.T @ (d @ v)
            v = v / v.norm().clamp_min(1e-30)
        fro = d.pow(2).sum()
        out.update(w_rel_change=float(fro.sqrt() / w0.double().norm()),
                   w_top_share=float((d @ v).pow(2).sum() / fro.clamp_min(1e-30)))
    return out


def train_run(kind: str, k: int, e: int, variant: dict, feats: dict, args) -> dict:
    train, heldout = feats["train"], feats["heldout"]
    mean, std = train.mean(0), train.std(0)
    t_init = time.time()
    q, lift = build(kind, k, e, train, variant, args.seed, args.init_tokens)
    t_init = time.time() - t_init
    q, train, heldout = q.to(args.device), train.to(args.device), heldout.to(args.device)
    mean, std = mean.to(args.device), std.to(args.device)
    if lift is not None:
        lift = lift.to(args.device)
    named = [(n, p) for n, p in q.named_parameters() if p.requires_grad]
    role = lambda n: "w" if n.startswith("codebook_transform.") else "p" if n.startswith("proj_in.") else "rest"  # noqa: E731
    groups = []
    for part in ("rest", "p", "w"):
        for decay in (True, False):
            ps = [p for n, p in named if role(n) == part and (p.ndim >= 2) == decay]
            if ps:
                groups.append(dict(params=ps, weight_decay=1e-4 if decay else 0.0, is_w=part == "w",
                                   scale=variant.get(f"{part}_lr", 1.0) if part != "rest" else 1.0))
    adam_groups = [g for g in groups if not (g["is_w"] and variant.get("w_opt") == "sgd")]
    sgd_groups = [g for g in groups if g["is_w"] and variant.get("w_opt") == "sgd"]
    opts = [torch.optim.AdamW(adam_groups, lr=args.lr, betas=(0.9, 0.999))]
    if sgd_groups:
        opts.append(torch.optim.SGD(sgd_groups, lr=args.lr, momentum=0.9))
    params = [p for _, p in named]
    order = torch.Generator().manual_seed(args.seed)  # the same batches for every run
    curve_set = heldout[: args.curve_tokens]
    eval_at = sorted({int(round(args.steps * f)) for f in np.linspace(0, 1, args.curve_points)})
    window = CodebookUsage(k, window=max(1, args.curve_tokens // args.batch))
    w0 = q.codebook_transform.weight.detach().clone() if hasattr(q, "codebook_transform") else None
    curve, t0 = [], time.time()
    for step in range(args.steps + 1):
        if step in eval_at:
            m = measure(q, lift, curve_set, mean, std, k)
            curve.append(dict(step=step, heldout_use_pct=m["use_pct"], perplexity=m["perplexity"], fvu=m["fvu"],
                              window_use_pct=100 * window.usage() if step else None, z_over_c=m["z_over_c"],
                              **w_change(q, w0), seconds=time.time() - t0))
        if step == args.steps:
            break
        x = train[torch.randint(0, train.shape[0], (args.batch,), generator=order).to(train.device)]
        out = losses(q, lift, x, (x - mean) / std)
        window.update(out["indices"])
        loss = out["recon"] + LossConfig().commit_weight * out["commit"] + LossConfig().codebook_weight * out["codebook"]
        lr = lr_at(step, args.steps, args.lr, args.min_lr, max(1, int(args.warmup * args.steps)))
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr * g["scale"]
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in opts:
            opt.step()
    final = measure(q, lift, heldout, mean, std, k)
    geo = code_geometry(q, heldout, lift)
    return dict(final=final, geometry=geo, curve=curve, seconds=time.time() - t0 + t_init, init_seconds=t_init)


@torch.no_grad()
def reference_use(feats: dict, k: int, seed: int, kmeans_tokens: int, device: torch.device) -> dict:
    """Use % on the held-out tokens of two codebooks built without training, in the standardised token space:
    K draws from a Gaussian with the training tokens' mean and covariance (the best case of a SimVQ codebook
    C'W^T, whose codes are Gaussian, when W matches the data) and k-means centroids of training tokens."""
    from vqrae.quantizer import kmeans

    train, heldout = feats["train"], feats["heldout"]
    mean, std = train.mean(0), train.std(0)
    t, h = ((train - mean) / std).to(device), ((heldout - mean) / std).to(device)
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.cov(t.T.double()) + 1e-6 * torch.eye(t.shape[1], dtype=torch.float64, device=device))
    out = {}
    for name, codes in (("gaussian", torch.randn(k, t.shape[1], generator=g).to(device) @ chol.float().T),
                        ("kmeans", kmeans(t[torch.randperm(t.shape[0], generator=g)[:kmeans_tokens].to(device)], k, 10, g)
                         if kmeans_tokens >= k else None)):
        if codes is None:
            continue
        usage = CodebookUsage(k, window=1)
        usage.update(nearest_code(h, codes))
        out[name] = {"use_pct": 100 * usage.usage(), "perplexity": usage.perplexity()}
    return out


# -- report ---------------------------------------------------------------------------------------------------
def plot(rows: list, refs: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    grid = [r for r in rows if r["variant"] == "base"]
    sizes, dims = sorted({r["K"] for r in grid}), sorted({r["e"] for r in grid})
    starts = [r for r in rows if r["variant"].startswith("init=")]
    panels = len(sizes) + 2 + bool(starts)
    cols = math.ceil(panels / 2)
    fig, axes = plt.subplots(2, cols, figsize=(6 * cols, 9), squeeze=False)
    axes = axes.flatten()
    for ax in axes[panels:]:
        ax.axis("off")
    axes = axes[:panels]
    colours = plt.cm.viridis(np.linspace(0, 0.85, max(1, len(dims))))
    for ax, k in zip(axes, sizes):
        for r in grid:
            if r["K"] == k:
                ax.plot([p["step"] for p in r["curve"]], [p["heldout_use_pct"] for p in r["curve"]], marker=".",
                        color=colours[dims.index(r["e"])], ls="-" if r["kind"] == "SimVQ" else "--",
                        label=f"{r['kind']} e={r['e']}")
        ax.set(title=f"K={k}: use of held-out tokens over training", xlabel="step", ylabel="use % (curve subset)",
               ylim=(0, 101))
        ax.legend(fontsize=7)
    ax = axes[len(sizes)]
    for i, k in enumerate(sizes):
        for kind, ls in (("SimVQ", "-"), ("VQ", "--")):
            pts = sorted((r["e"], r["final"]["use_pct"]) for r in grid if r["K"] == k and r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o", color=f"C{i}", label=f"{kind} K={k}")
        for j, (name, ref) in enumerate(refs.get(str(k), {}).items()):
            ax.axhline(ref["use_pct"], color=f"C{i}", lw=0.8, ls=":" if j else "-.", label=f"untrained {name} K={k}")
    for r in rows:
        if r["variant"] in ("init=matched", "init=kmeans") and r["kind"] == "SimVQ":
            ax.plot(r["e"], r["final"]["use_pct"], "D" if r["variant"] == "init=matched" else "s",
                    color=f"C{sizes.index(r['K'])}" if r["K"] in sizes else "k", mfc="none", ms=9,
                    label=f"SimVQ {r['variant']}, K={r['K']}")
    ax.plot(list(PAPER_E), list(PAPER_E.values()), "k*-", label="paper SimVQ K=16384")
    ax.set(title="final use of all held-out tokens", xlabel="codebook dim e", ylabel="use %", xscale="log", ylim=(0, 101))
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if starts:  # each data-fitted start beside the identity start of its cell
        ax = axes[len(sizes) + 1]
        cells = sorted({(r["K"], r["e"]) for r in starts})
        for r in rows:
            if r["kind"] == "SimVQ" and (r["K"], r["e"]) in cells and (r["variant"] == "base" or r in starts):
                ax.plot([p["step"] for p in r["curve"]], [p["heldout_use_pct"] for p in r["curve"]], marker=".",
                        color=f"C{cells.index((r['K'], r['e']))}",
                        ls={"base": ":", "init=matched": "-", "init=kmeans": "--"}.get(r["variant"], "-."),
                        label=f"{r['variant']} (K={r['K']}, e={r['e']})")
        ax.set(title="SimVQ: identity (base) against data-fitted starts", xlabel="step", ylabel="use % (curve subset)",
               ylim=(0, 101))
        ax.legend(fontsize=6)
    ax = axes[-1]
    for i, r in enumerate(r for r in rows if r not in starts and (r["variant"] != "base" or (
            r["kind"] == "SimVQ" and r["e"] == 256 and r["K"] == 4096))):
        ax.plot([p["step"] for p in r["curve"]], [p["heldout_use_pct"] for p in r["curve"]], marker=".",
                color=plt.cm.tab20(i % 20), ls="-" if r["kind"] == "SimVQ" else "--",
                label=f"{r['kind']} {r['variant']} (K={r['K']}, e={r['e']})")
    ax.set(title="hypothesis runs (K=4096, e=256)", xlabel="step", ylabel="use % (curve subset)", ylim=(0, 101))
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    print(f"plot written to {path}")


def table(rows: list, refs: dict, heldout: int) -> str:
    ceiling = lambda k: 100 * (1 - (1 - 1 / k) ** heldout)  # noqa: E731
    lines = ["| K | e | kind | variant | use % | perplexity | recon FVU | quant. err | ||z||/||c|| | code eff. dim "
             "| use % at step 0 / mid / end (curve) | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, g, c = r["final"], r["geometry"], r["curve"]
        mid = c[len(c) // 2]["heldout_use_pct"]
        lines.append(f"| {r['K']} | {r['e']} | {r['kind']} | {r['variant']} | {f['use_pct']:.1f} | {f['perplexity']:.0f} "
                     f"| {f['fvu']:.3f} | {f['qerr']:.3f} | {f['z_over_c']:.2f} | {g['code_dim']:.1f} "
                     f"| {c[0]['heldout_use_pct']:.1f} / {mid:.1f} / {c[-1]['heldout_use_pct']:.1f} | {r['seconds']:.0f} |")
    for k, ref in sorted(refs.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {k} | - | untrained | " + " / ".join(f"{n}: {v['use_pct']:.1f} % (perplexity {v['perplexity']:.0f})"
                                                         for n, v in ref.items()) + " | | | | | | | | |")
    lines.append(f"\nuniform-use ceiling on {heldout} held-out tokens: " + ", ".join(
        f"K={k}: {ceiling(k):.1f} %" for k in sorted({r['K'] for r in rows})))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the whole study of docs/codebook_study.md: defaults "
                   + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in FULL.items()) + " (instead of "
                   + ", ".join(f"{v}" for v in QUICK.values()) + ")")
    p.add_argument("--dims", default=None, help=f"codebook dimensions e of the grid (default {QUICK['dims']})")
    p.add_argument("--sizes", default=None, help=f"codebook sizes K of the grid (default {QUICK['sizes']})")
    p.add_argument("--kinds", default="SimVQ,VQ")
    p.add_argument("--variants", default=None, help="hypothesis runs, ';'-separated, each "
                   "'K:e:kind:opt=v+opt=v' (see the docstring), e.g. '16384:1536:SimVQ:w_lr=0.01'; 'starts' (the "
                   "default) matched against identity starts at K=4096, e=256 and 768 and at K=16384, e=256; "
                   "'mechanism' (--full) every run in docs/codebook_study.md; '' none")
    p.add_argument("--init-tokens", type=int, default=65536, help="training tokens the init=matched/kmeans starts "
                   "are fitted to (calibrate_quantizer's minimum)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=1024, help="tokens per step (the demo tokenizer's 32 images x 36 = 1152)")
    p.add_argument("--lr", type=float, default=4e-4, help="peak AdamW lr (the paper's)")
    p.add_argument("--min-lr", type=float, default=1e-4, help="cosine floor (the paper's)")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup, as a fraction of the steps")
    p.add_argument("--train-images", type=int, default=6144, help="images behind the training tokens (36 each)")
    p.add_argument("--heldout", type=int, default=65536, help="held-out tokens measured after training")
    p.add_argument("--curve-tokens", type=int, default=16384, help="held-out tokens measured along the curve")
    p.add_argument("--curve-points", type=int, default=6)
    p.add_argument("--encoder-config", default="configs/tokenizer/demo_stage1.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/codebook_study")
    p.add_argument("--plot", default=None, help="PNG of the curves (default <out>/curves.png)")
    p.add_argument("--kmeans-tokens", type=int, default=None, help="training tokens for the k-means reference "
                   f"codebook (0: skip it; default {QUICK['kmeans_tokens']}, --full {FULL['kmeans_tokens']})")
    p.add_argument("--kmeans-max-k", type=int, default=4096, help="k-means reference only up to this K (its "
                   "k-means++ seeding is K sequential steps: ~9 CPU-minutes at K=4096)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for key, value in (FULL if args.full else QUICK).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    check_step_matches_module()

    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = encoder_features(args)
    print(f"stand-in encoder tokens: {feats['train'].shape[0]} train / {feats['heldout'].shape[0]} held-out, "
          f"D={feats['train'].shape[1]}, effective dim {feats['participation']:.1f} ({time.time() - start:.0f}s)", flush=True)
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    runs = [(k, e, kind, "base") for k in ints(args.sizes) for e in ints(args.dims) for kind in args.kinds.split(",")]
    named = {"mechanism": MECHANISM, "starts": STARTS}
    for spec in filter(None, named.get(args.variants, args.variants).split(";")):
        k, e, kind, var = spec.split(":")
        if (int(k), int(e), kind, var) not in runs:
            runs.append((int(k), int(e), kind, var))
    log_path = os.path.join(args.out, "cells.jsonl")
    setting = dict(steps=args.steps, batch=args.batch, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
                   seed=args.seed, heldout=feats["heldout"].shape[0], curve_tokens=args.curve_tokens)
    done = {}
    if os.path.isfile(log_path):
        for line in open(log_path):
            r = json.loads(line)
            # a data-fitted start counts as done only if fitted to as many tokens as asked for now
            fitted = any(part.startswith("init=") for part in r["variant"].split("+"))
            if r["setting"] == setting and (not fitted or r.get("init_tokens") == args.init_tokens):
                done[(r["K"], r["e"], r["kind"], r["variant"])] = r
    ref_path = os.path.join(args.out, "references.json")
    refs = json.load(open(ref_path)) if os.path.isfile(ref_path) else {}
    for k in sorted({r[0] for r in runs}):
        if str(k) not in refs:
            t0 = time.time()
            refs[str(k)] = reference_use(feats, k, args.seed, args.kmeans_tokens if k <= args.kmeans_max_k else 0,
                                         args.device)
            print(f"  K={k} untrained references: {refs[str(k)]} ({time.time() - t0:.0f}s)", flush=True)
            on_disk = json.load(open(ref_path)) if os.path.isfile(ref_path) else {}  # another run may have added some
            refs = {**on_disk, **refs}
            with open(ref_path, "w") as f:
                json.dump(refs, f, indent=1)
    rows = []
    for k, e, kind, var in runs:
        if (k, e, kind, var) not in done:
            r = dict(K=k, e=e, kind=kind, variant=var, setting=setting, init_tokens=args.init_tokens,
                     **train_run(kind, k, e, parse_variant(var), feats, args))
            with open(log_path, "a") as f:
                f.write(json.dumps(r) + "\n")
            done[(k, e, kind, var)] = r
            print(f"  K={k} e={e} {kind} {var}: use {r['final']['use_pct']:.1f} % perplexity {r['final']['perplexity']:.0f} "
                  f"fvu {r['final']['fvu']:.3f} curve {[round(c['heldout_use_pct'], 1) for c in r['curve']]} "
                  f"({r['seconds']:.0f}s)", flush=True)
        rows.append(done[(k, e, kind, var)])
    print(f"\ntotal {time.time() - start:.0f}s; {args.steps} steps x {args.batch} tokens, AdamW {args.lr} -> {args.min_lr}\n")
    print(table(rows, refs, feats["heldout"].shape[0]))
    plot(rows, refs, args.plot or os.path.join(args.out, "curves.png"))


if __name__ == "__main__":
    main()
