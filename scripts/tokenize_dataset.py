"""Compute the VQRAE codes of every image of a data set once, for ``data.generation.codes_from``.

    python scripts/tokenize_dataset.py --vqrae outputs/vqrae_siglip2_stage2/model --data data/t2i --out outputs/codes/t2i
    python scripts/tokenize_dataset.py --vqrae ... --data some/hub-dataset --split train --dtype float32

``--data`` is an imagefolder directory, webdataset shards (``.tar``) or a hub dataset id, as in the trainer's
``data.generation.source``. The codes go to an Arrow file in ``--out`` (``datasets`` map cache: a rerun with
the same inputs reuses it) with ``codes.json``, which the trainer checks against its VQRAE, resolution and
row count. Use the trainer's compute dtype (``run.precision``: bf16 -> bfloat16) to get exactly the codes it
would compute on the fly.
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqrae import cli  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--vqrae", required=True, help="VQRAE checkpoint directory (or a unified model export's vqrae/)")
    p.add_argument("--data", required=True, help="imagefolder directory, .tar shards or hub dataset id")
    p.add_argument("--split", default="train")
    p.add_argument("--image-column", default="image")
    p.add_argument("--out", default=None, help="output directory (default: outputs/codes/<data>-<split>)")
    p.add_argument("--resolution", type=int, default=None, help="crop side (default: the VQRAE encoder's image size)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="VQRAE compute dtype")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding threads")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from mllm.codes import write_codes
    from vqrae import VQRAE

    out = args.out or os.path.join("outputs", "codes", re.sub(r"[^\w.-]+", "_", args.data.strip("/")) + f"-{args.split}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vqrae = VQRAE.from_pretrained(args.vqrae).eval()
    manifest = write_codes(
        vqrae, args.data, out, split=args.split, image_column=args.image_column, resolution=args.resolution,
        device=device, dtype=getattr(torch, args.dtype), batch_size=args.batch_size, workers=args.workers,
    )
    print(f"{manifest['num_rows']} rows ({manifest['status']}) -> {out}; train with data.generation.codes_from={out}")


if __name__ == "__main__":
    sys.exit(cli.main(main))
