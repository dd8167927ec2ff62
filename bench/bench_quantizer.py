"""Nearest-code search at the paper's codebook size: ``vqrae.nearest_code`` against ``torch.cdist(z, C).argmin(-1)``.

K=16384 codes of e=1536 dimensions, M query tokens (16384 on a GPU, a batch of 64 images of 16 x 16 tokens;
2048 on a CPU). Codes follow SimVQ's base codebook N(0, 1/e). Queries (``--queries``) are i.i.d. from the same
law ("random", the hard case for the shortlist below: a query's best few codes are nearly tied) or a code plus
noise of half its norm ("near-codes", closer to trained features, which sit near one code). Every method runs in the same process on the same tensors; the table gives the median
time over repeats after warm-up, the speed-up over cdist, the memory above the inputs and the agreement of
the indices with an exact float64 search (a disagreement is reported with the float64 distance gap, so fp32
rounding ties can be told from real errors).

Memory: on a GPU the CUDA allocator's peak above the inputs (exact). On a CPU the peak resident set size
above the level at entry, sampled every millisecond by a thread (approximate: allocator caching can hide
or delay a release), printed next to the size of the distance buffer each method materialises (theory).

``shortlist`` (``--shortlist``, on by default on a GPU) is an exact fast path: one bf16 GEMM over augmented
operands gives approximate distances d~ = ||c||^2 - 2 z.c with a proven per-row error bound eps (operand and
output rounding of bf16, fp32 accumulation, Cauchy-Schwarz); the k best approximate codes are re-ranked with
fp32 distances; a row is certified when its k-th approximate distance minus eps exceeds the best re-ranked
distance, since then no code outside the shortlist can be nearer; uncertified rows are searched again with
``nearest_code``. The result equals the exact fp32 search up to fp32 ties.

``--mode train-step`` times one SimVQ training step (forward, backward) as ``SimVQ.forward`` computes it (the
codebook C = C'W^T without a graph for the search, the codes in use recomputed as W(C'[idx])) against the
formulation before it (C with W's graph over all K codes, indexed after the search), methods interleaved
repeat by repeat, and checks both give the same indices and gradients.

``--mode faiss`` (CPU) times ``nearest_code`` against FAISS's exact flat search (``faiss.knn``, the kernel of
``IndexFlatL2``), interleaved, one thread each unless ``--threads``: plain L2, which adds ||z||^2 in fp32, and an
inner-product search over augmented operands [z, 1] . [c, -||c||^2 / 2], the distance ``nearest_code`` uses.
``--query-scale`` multiplies the queries; untrained projected features have ||z|| ~ 20 against codes of norm
~1, where the fp32 ||z||^2 term of plain L2 swamps small distance gaps.

    python bench/bench_quantizer.py                                  # CPU: 2048 tokens
    python bench/bench_quantizer.py --device cuda --tokens 16384 --json out.json
    taskset -c 0 python bench/bench_quantizer.py --mode train-step --tokens 1024
    taskset -c 0 python bench/bench_quantizer.py --mode faiss --tokens 65536 --codes 4096 --dim 256 --query-scale 20
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from peak_memory import PeakMemory  # noqa: E402  (bench/, the script's folder)
from vqrae.quantizer import SimVQ, nearest_code  # noqa: E402

BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
FP32_U = 2.0**-24


def timed(fn, device: torch.device, warmup: int, repeats: int):
    """(median seconds, peak extra MiB over the repeats, last result)."""
    for _ in range(warmup):
        out = fn()
    times, peak = [], 0.0
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peak = max(peak, mem.extra_mib)
    return statistics.median(times), peak, out


@torch.no_grad()
def exact_f64(z: torch.Tensor, codebook: torch.Tensor, token_chunk: int = 1024) -> torch.Tensor:
    """Reference indices: argmin of float64 squared distances."""
    c = codebook.double()
    c_sq = c.pow(2).sum(-1)
    return torch.cat([torch.addmm(c_sq.unsqueeze(0), zt, c.t(), alpha=-2.0).argmin(1) for zt in z.double().split(token_chunk)])


def _f64_distance(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    c = codebook.double()[idx]
    return (c - z.double()).pow(2).sum(-1)


@torch.no_grad()
def shortlist_nearest(z: torch.Tensor, codebook: torch.Tensor, k: int = 8, token_chunk: int = 4096) -> tuple[torch.Tensor, float]:
    """Exact nearest code through a bf16 shortlist and an fp32 re-rank; returns (indices, certified fraction).

    Distances come from one GEMM of augmented operands [z, 1] . [-2c, ||c||^2] (padded to a multiple of 16
    for tensor cores). With u the bf16 unit roundoff, each product carries at most (2u + u^2) relative error
    from rounding the operands, fp32 accumulation adds at most n * 2^-24 and rounding the bf16 output u, all
    relative to sum_i |a_i b_i| <= ||a|| ||b||: that is the row bound eps used to certify the shortlist.
    """
    z = z.float()
    codebook = codebook.float()
    m, e = z.shape
    c_sq = codebook.pow(2).sum(-1)  # (K,)
    width = -(-(e + 1) // 16) * 16
    c_aug = torch.zeros(codebook.shape[0], width, device=z.device, dtype=torch.float32)
    c_aug[:, :e] = -2.0 * codebook
    c_aug[:, e] = c_sq
    c_aug_norm = c_aug.norm(dim=1).max()
    c_aug = c_aug.to(torch.bfloat16)
    # 1.01 covers the products of small terms the sum leaves out
    gamma = 1.01 * (3 * BF16_U + BF16_U**2 + width * FP32_U * (1 + BF16_U) ** 2)
    out = torch.empty(m, dtype=torch.long, device=z.device)
    certified = torch.empty(m, dtype=torch.bool, device=z.device)
    rerank_rows = max(1, 2**25 // (k * e))  # bounds the gathered candidate codes at 128 MiB
    for t0 in range(0, m, token_chunk):
        zt = z[t0 : t0 + token_chunk]
        z_aug = torch.zeros(zt.shape[0], width, device=z.device, dtype=torch.float32)
        z_aug[:, :e] = zt
        z_aug[:, e] = 1.0
        z_norm = z_aug.norm(dim=1)
        approx = z_aug.to(torch.bfloat16) @ c_aug.t()  # (T, K) bf16: distances minus ||z||^2
        kth, cand = approx.topk(k, dim=1, largest=False)  # (T, k), ascending
        del approx
        for r0 in range(0, zt.shape[0], rerank_rows):
            rows = slice(r0, r0 + rerank_rows)
            cr = cand[rows]
            exact = c_sq[cr] - 2.0 * torch.bmm(codebook[cr], zt[rows].unsqueeze(-1)).squeeze(-1)  # (R, k) fp32
            best_val, best_pos = exact.min(dim=1)
            eps = gamma * z_norm[rows] * c_aug_norm  # bound on |d~ - d| for every code of the row
            # fp32 re-rank error: it only matters at an fp32 tie, which the exact path would face too
            margin = width * FP32_U * z_norm[rows] * c_aug_norm
            span = slice(t0 + r0, t0 + r0 + cr.shape[0])
            certified[span] = kth[rows, -1].float() - eps > best_val + margin
            out[span] = cr.gather(1, best_pos.unsqueeze(1)).squeeze(1)
    redo = torch.nonzero(~certified).squeeze(1)  # the one host sync
    if redo.numel():
        out[redo] = nearest_code(z[redo], codebook)
    return out, 1.0 - redo.numel() / m


def interleaved(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    """{name: (median seconds, last result)}, the methods taking turns within every repeat so that load from
    other processes falls on all of them alike."""
    times = {name: [] for name in fns}
    out = {}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), out[name]) for name in fns}


def full_codebook_forward(q: SimVQ, x: torch.Tensor):
    """SimVQ's forward before the gather: C = C'W^T with W's graph over all K codes, indexed after the search."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = q.project(x.float())
        codebook = q.codebook
        indices = nearest_code(z.reshape(-1, z.shape[-1]).detach(), codebook.detach(), q.search_chunk, q.token_chunk)
        c = F.embedding(indices, codebook).view_as(z)
        return q.proj_out(z + (c - z).detach()), indices, F.mse_loss(c, z.detach()), F.mse_loss(z, c.detach())


def bench_train_step(args, device: torch.device, m: int, warmup: int, repeats: int) -> None:
    torch.manual_seed(0)
    q = SimVQ(args.width, args.codes, args.dim).to(device)
    with torch.no_grad():
        q.codebook_transform.weight.add_(0.01 * torch.randn_like(q.codebook_transform.weight))
    x = torch.randn(1, m, args.width, device=device)

    def step(forward):
        def run():
            q.zero_grad(set_to_none=True)
            quantized, indices, codebook_loss, commit_loss = forward(x)
            (quantized.square().mean() + codebook_loss + commit_loss).backward()
            return indices.flatten(), {n: p.grad.clone() for n, p in q.named_parameters()}
        return run

    def gathered(x):
        out = q(x)
        return out.quantized, out.indices, out.codebook_loss, out.commit_loss

    print(f"device={device} threads={torch.get_num_threads()} M={m} K={args.codes} e={args.dim} D={args.width} "
          f"repeats={repeats} warmup={warmup}", flush=True)
    res = interleaved({"gather C'[idx], then W (SimVQ.forward)": step(gathered),
                       "full codebook C'W^T with W's graph (before)": step(lambda x: full_codebook_forward(q, x))},
                      device, warmup, repeats)
    (new_t, (new_idx, new_g)), (old_t, (old_idx, old_g)) = res.values()
    worst = max(((new_g[n] - old_g[n]).abs().max() / old_g[n].abs().max()).item() for n in new_g)
    print()
    print("| forward + backward | time (ms) | speed-up |")
    print("|---|---|---|")
    for name, (t, _) in res.items():
        print(f"| {name} | {1e3 * t:.1f} | {old_t / t:.2f}x |")
    print(f"\nindices equal: {torch.equal(new_idx, old_idx)}; largest gradient difference over the gradient's max "
          f"(W, projections): {worst:.1e}")


def bench_faiss(args, m: int, warmup: int, repeats: int) -> None:
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(args.codes, args.dim, generator=g) * args.dim**-0.5
    z = torch.randn(m, args.dim, generator=g) * args.dim**-0.5 * args.query_scale
    if args.queries == "near-codes":
        z = codebook[torch.randint(0, args.codes, (m,), generator=g)] + 0.5 * z

    def faiss_l2():
        return torch.from_numpy(faiss.knn(z.numpy(), codebook.numpy(), 1)[1][:, 0])

    def faiss_ip():  # argmax [z, 1] . [c, -||c||^2 / 2] = argmin ||c||^2 - 2 z.c, no ||z||^2 term
        za = torch.cat([z, z.new_ones(m, 1)], dim=1)
        ca = torch.cat([codebook, -0.5 * codebook.pow(2).sum(-1, keepdim=True)], dim=1)
        return torch.from_numpy(faiss.knn(za.numpy(), ca.numpy(), 1, metric=faiss.METRIC_INNER_PRODUCT)[1][:, 0])

    print(f"faiss {faiss.__version__} threads={args.threads} queries={args.queries} x{args.query_scale} M={m} "
          f"K={args.codes} e={args.dim} repeats={repeats} warmup={warmup}", flush=True)
    res = interleaved({"nearest_code (torch, fp32)": lambda: nearest_code(z, codebook),
                       "faiss.knn L2 (IndexFlatL2's search)": faiss_l2,
                       "faiss.knn inner product, augmented": faiss_ip}, torch.device("cpu"), warmup, repeats)
    ref = exact_f64(z, codebook)
    ref_d = _f64_distance(z, codebook, ref)
    base_t, base_out = res["nearest_code (torch, fp32)"]
    print()
    print("| method | time (ms) | speed-up vs nearest_code | indices != nearest_code | != fp64 exact "
          "| fp64 distance gap of those |")
    print("|---|---|---|---|---|---|")
    for name, (t, out) in res.items():
        wrong = out != ref
        gap = (_f64_distance(z[wrong], codebook, out[wrong]) - ref_d[wrong]).max().item() if wrong.any() else 0.0
        print(f"| {name} | {1e3 * t:.1f} | {base_t / t:.2f}x | {int((out != base_out).sum())} / {m} "
              f"| {int(wrong.sum())} / {m} | {gap:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="M query tokens (default 16384 on a GPU, 2048 on a CPU)")
    p.add_argument("--codes", type=int, default=16384, help="K")
    p.add_argument("--dim", type=int, default=1536, help="e")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 20 on a GPU, 3 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5 on a GPU, 1 on a CPU)")
    p.add_argument("--shortlist", type=int, default=None, help="k of the bf16 shortlist path; 0 skips it (default 16 on a GPU, 0 on a CPU)")
    p.add_argument("--queries", default="random", choices=["random", "near-codes"],
                   help="random: i.i.d. like the codes (hard for the shortlist); near-codes: a code plus noise of half its norm, as trained features sit")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--mode", default="search", choices=["search", "train-step", "faiss"],
                   help="search: the search table; train-step: SimVQ forward + backward, gathered vs full codebook; "
                        "faiss: nearest_code vs FAISS flat search on the CPU")
    p.add_argument("--width", type=int, default=1152, help="train-step: encoder width D (SigLIP2 so400m: 1152)")
    p.add_argument("--threads", type=int, default=1, help="faiss: threads for torch and FAISS alike")
    p.add_argument("--query-scale", type=float, default=1.0, help="faiss: multiply the query noise (||z|| ~ scale)")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    m = args.tokens or (16384 if gpu else 2048)
    repeats, warmup = args.repeats or (20 if gpu else 3), args.warmup if args.warmup is not None else (5 if gpu else 1)
    if args.mode == "train-step":
        torch.backends.cuda.matmul.allow_tf32 = False
        return bench_train_step(args, device, m, warmup, repeats)
    if args.mode == "faiss":
        return bench_faiss(args, m, warmup, repeats)
    shortlist = args.shortlist if args.shortlist is not None else (16 if gpu else 0)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the exact methods
        # the shortlist's error bound assumes fp32 accumulation, also across split-K partial sums
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    g = torch.Generator(device=device).manual_seed(0)
    codebook = torch.randn(args.codes, args.dim, generator=g, device=device) * args.dim**-0.5
    z = torch.randn(m, args.dim, generator=g, device=device) * args.dim**-0.5
    if args.queries == "near-codes":
        z = codebook[torch.randint(0, args.codes, (m,), generator=g, device=device)] + 0.5 * z
    print(f"device={device} threads={torch.get_num_threads()} queries={args.queries} M={m} K={args.codes} e={args.dim} "
          f"repeats={repeats} warmup={warmup}", flush=True)

    ref = exact_f64(z, codebook)
    ref_d = _f64_distance(z, codebook, ref)
    methods = {
        "torch.cdist + argmin": (lambda: torch.cdist(z, codebook).argmin(-1), m * args.codes * 4),
        "nearest_code (fp32, chunked)": (lambda: nearest_code(z, codebook), min(m, 16384) * min(args.codes, 4096) * 4),
    }
    if shortlist:
        methods[f"shortlist bf16 k={shortlist} + fp32 re-rank"] = (
            lambda: shortlist_nearest(z, codebook, shortlist), min(m, 4096) * args.codes * 2 + 2**27)
    rows, fp32_exact = [], None
    for name, (fn, buffer_bytes) in methods.items():
        t, mib, out = timed(fn, device, warmup, repeats)
        certified = None
        if isinstance(out, tuple):
            out, certified = out
        if name.startswith("nearest_code"):
            fp32_exact = out
        wrong = out != ref
        gap = (_f64_distance(z[wrong], codebook, out[wrong]) - ref_d[wrong]).max().item() if wrong.any() else 0.0
        rows.append(dict(method=name, ms=1e3 * t, mib=mib, buffer_mib=buffer_bytes / 2**20, out=out,
                         vs_fp64=int(wrong.sum()), fp64_gap=gap, certified=certified))
        print(f"  {name}: {1e3 * t:.2f} ms", flush=True)
    for r in rows:
        r["vs_fp32"] = int((r.pop("out") != fp32_exact).sum())

    base = rows[0]["ms"]
    mem = "CUDA peak above inputs (MiB)" if gpu else "peak RSS above entry, sampled (MiB)"
    print()
    print(f"| method | time (ms) | speed-up vs cdist | {mem} | distance buffer (MiB, theory) "
          "| indices != fp32 exact | != fp64 exact | fp64 distance gap of those |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cert = f" (certified {100 * r['certified']:.1f}% of rows)" if r["certified"] is not None else ""
        print(f"| {r['method']}{cert} | {r['ms']:.2f} | {base / r['ms']:.2f}x | {r['mib']:.0f} | {r['buffer_mib']:.0f} "
              f"| {r['vs_fp32']} / {m} | {r['vs_fp64']} / {m} | {r['fp64_gap']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "quantizer", "device": str(device), "queries": args.queries, "tokens": m, "codes": args.codes, "dim": args.dim,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
