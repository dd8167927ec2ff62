"""Create the demo's stand-in LLM: a small randomly initialised LLaMA-shaped model and a word-level tokenizer
built from the shapes data set's captions and questions, saved like any Hugging Face model directory.

The model and tokenizer come from ``demo.llm``, the stand-in the tests and benchmarks use too. A real run names a
hub LLM instead (``model.llm: Qwen/Qwen3-0.6B``); nothing else changes.

Its weights are drawn at std 0.05 (``--init-std``), not Hugging Face's 0.02: at 0.02 this 128-wide model sat on a
loss plateau whose length depended on the data order (one order escaped it, the next did not within the demo's
steps); at 0.05 both escaped within 400 steps.

    python scripts/make_demo_llm.py [--data data/shapes] [--out outputs/demo/llm]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--out", default="outputs/demo/llm")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--init-std", type=float, default=0.05, help="std of the random weights (initializer_range)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    meta = os.path.join(args.data, "train", "metadata.jsonl")
    if not os.path.isfile(meta):
        print(f"error: no shapes data at {args.data}; run scripts/make_demo_data.py first", file=sys.stderr)
        sys.exit(2)
    from demo.llm import standin_llm, word_tokenizer

    texts = []
    for split in ("train", "test"):
        for line in open(os.path.join(args.data, split, "metadata.jsonl")):
            row = json.loads(line)
            texts += [row["caption"]] + [t for qa in row["questions"] for t in (qa["question"], qa["answer"])]
    # prompts end with a newline (no chat template): the model is trained from scratch on this format alone
    tokenizer = word_tokenizer(texts, chat=False, by_frequency=False)
    model = standin_llm("llama", len(tokenizer), args.seed, hidden_size=args.hidden,
                        intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, num_key_value_heads=args.heads,
                        initializer_range=args.init_std, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"demo LLM: {n / 1e6:.2f}M parameters, {len(tokenizer)} words, saved to {args.out}")


if __name__ == "__main__":
    main()
