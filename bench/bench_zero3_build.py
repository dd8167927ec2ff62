"""Peak host memory per rank while the unified model's LLM is built under ZeRO-3: partitioned from the start
(``mllm.train.build_model`` with the DeepSpeed config) against built whole on every rank (without it, as the
engine would otherwise receive it).

    deepspeed --num_gpus 2 bench/bench_zero3_build.py            # writes the LLM once, then both builds

Each build runs in its own launch (a process's peak never goes down), each rank reports its peak resident set
(``ru_maxrss``) after the build and once the ZeRO-3 engine holds the model (with its AdamW), its resident set
right after the build, and the parameter elements it holds then. A whole build can look small until the engine: transformers may leave the
weights in the memory-mapped file, resident only once touched. The LLM is a random Qwen3-0.6B-shaped model
(hidden 1024, 28 layers, 151936-row vocabulary: 0.6B parameters, written once in bf16 as the hub's checkpoints
are, under ``--root``; training loads it in fp32);
the VQRAE is a tiny random one with 16384 codes, whose tokens fit the padded vocabulary as Qwen3's do.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


SIZES = {  # Qwen3-shaped: hidden, layers, intermediate, heads, kv heads
    "0.6B": (1024, 28, 3072, 16, 8),
    "1.7B": (2048, 28, 6144, 16, 8),
}


def write_assets(root: str, size: str = "0.6B") -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.helpers import make_tokenizer, tiny_vqrae_config
    from vqrae import VQRAE

    paths = {"llm": os.path.join(root, "llm"), "vqrae": os.path.join(root, "vqrae")}
    if not os.path.isfile(os.path.join(paths["llm"], "config.json")):
        tokenizer = make_tokenizer()
        tokenizer.save_pretrained(paths["llm"])
        torch.manual_seed(0)
        hidden, layers, inner, heads, kv = SIZES[size]
        config = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, tie_word_embeddings=True)
        Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(paths["llm"])  # as hub checkpoints are stored
        VQRAE(tiny_vqrae_config(codebook_size=16384)).save_pretrained(paths["vqrae"])
    return paths


def build(mode: str, root: str, engine: bool) -> None:
    """One rank's build; prints a JSON line."""
    import deepspeed
    import psutil

    from mllm.train import MLLMTrainConfig, build_model, trainable_groups, unregister_vqrae
    from vqrae.config import load_config
    from vqrae.runtime.config import deepspeed_config
    from vqrae.runtime.distributed import init_distributed
    from vqrae.runtime.optim import make_optimizer

    paths = write_assets(root)  # written by the parent already
    cfg = load_config(MLLMTrainConfig, None, [f"model.llm={paths['llm']}", f"model.vqrae={paths['vqrae']}",
                                              "run.zero_stage=3", "run.batch_size=2", "run.micro_batch_size=1"])
    rank, world, _ = init_distributed()
    ds_cfg = deepspeed_config(cfg.run, cfg.optim, world)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    model, _ = build_model(cfg, ds_cfg if mode == "partitioned" else None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    now = psutil.Process().memory_info().rss / 2**30
    params = list(model.llm.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    engine_peak = float("nan")
    if engine:
        unregister_vqrae(model)
        optimizer = make_optimizer(trainable_groups(model, cfg), cfg.optim)
        deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        engine_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"mode": mode, "rank": rank, "world": world, "llm_params": total, "held": held,
                      "peak_gib": round(peak, 2), "built_gib": round(now, 2), "engine_peak_gib": round(engine_peak, 2),
                      "before_build_gib": round(before, 2)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="outputs/bench_zero3_build", help="where the LLM is written once (one per size)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.6B", help="the LLM's shape")
    ap.add_argument("--no-engine", action="store_true", help="the build alone (a whole 1.7B engine needs > 24 GB)")
    ap.add_argument("--mode", choices=["partitioned", "whole"], help=argparse.SUPPRESS)  # one launched build
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        build(args.mode, args.root, not args.no_engine)
        return
    write_assets(args.root, args.size)
    results = {}
    for mode in ("whole", "partitioned"):
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(args.ranks),
               os.path.abspath(__file__), "--mode", mode, "--root", args.root] + (["--no-engine"] if args.no_engine else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[mode] = [json.loads(line[line.index("{"):]) for line in out.splitlines() if '"mode"' in line]
    print(f"{'build':<12} {'rank':>4} {'LLM params':>11} {'held here':>10} {'RSS GiB after build':>20} "
          f"{'peak: build':>12} {'engine ready':>13}")
    for mode, rows in results.items():
        for r in sorted(rows, key=lambda r: r["rank"]):
            print(f"{mode:<12} {r['rank']:>4} {r['llm_params'] / 1e9:>10.3f}B {r['held'] / r['llm_params']:>9.1%} "
                  f"{r['built_gib']:>20.2f} {r['peak_gib']:>12.2f} {r['engine_peak_gib']:>13.2f}")
    for key in ("built_gib", "peak_gib", "engine_peak_gib"):
        whole, part = (max(r[key] for r in results[m]) for m in ("whole", "partitioned"))
        print(f"{key}: partitioned / whole = {part / whole:.2f}")


if __name__ == "__main__":
    main()
