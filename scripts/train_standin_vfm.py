"""Train a small ViT on the built-in shapes data so the demo has a *semantic* vision encoder offline.

A real VQRAE starts from a pretrained foundation model (SigLIP2, DINOv2). None can be downloaded here, so
the demo first trains a stand-in: a timm ViT that predicts every attribute of the picture (colour, shape,
size, position, background) from its pooled tokens, and the colour under each patch from that patch's
token, so both global and patch features carry meaning. It is saved as a timm ``model.safetensors``, the
same format a real encoder is loaded from (``encoder.weights``), so swapping in SigLIP2 or DINOv2 is a
config change only.

    python scripts/train_standin_vfm.py [--data data/shapes] [--out outputs/demo/vfm] [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from vqrae import shapes  # noqa: E402

# The architecture the demo tokenizer config names (configs/tokenizer/demo_stage1.yaml: encoder.model_kwargs).
ARCH = dict(name="vit_small_patch16_224", img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)
HEADS = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS), "size": tuple(shapes.SIZES),
         "position": shapes.POSITIONS, "background": tuple(shapes.BACKGROUNDS)}
PALETTE = tuple(shapes.COLOURS) + tuple(shapes.BACKGROUNDS)


def load_split(folder: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Images in [-1, 1], attribute labels, and the palette colour of each 8x8 patch."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl"))]
    imgs = np.stack([np.asarray(Image.open(os.path.join(folder, r["file_name"])).convert("RGB")) for r in rows])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = {k: torch.tensor([v.index(r[k]) for r in rows]) for k, v in HEADS.items()}
    pal = torch.tensor([shapes.COLOURS.get(c) or shapes.BACKGROUNDS[c] for c in PALETTE], dtype=torch.float) / 127.5 - 1
    p = ARCH["patch_size"]
    patches = F.avg_pool2d(x, p).permute(0, 2, 3, 1)  # (B, g, g, 3) mean colour of each patch
    patch_colour = torch.cdist(patches.reshape(-1, 3), pal).argmin(-1).view(x.shape[0], -1)
    return x, labels, patch_colour


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--out", default="outputs/demo/vfm")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import timm
    from safetensors.torch import save_file

    if not os.path.isfile(os.path.join(args.data, "train", "metadata.jsonl")):
        print(f"error: no shapes data at {args.data}; run scripts/make_demo_data.py first", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(args.seed)
    x, labels, patch_colour = load_split(os.path.join(args.data, "train"))
    kw = {k: v for k, v in ARCH.items() if k != "name"}
    vit = timm.create_model(ARCH["name"], pretrained=False, num_classes=0, **kw)
    d = vit.num_features
    heads = nn.ModuleDict({k: nn.Linear(d, len(v)) for k, v in HEADS.items()})
    patch_head = nn.Linear(d, len(PALETTE))
    params = list(vit.parameters()) + list(heads.parameters()) + list(patch_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (args.batch_size,))
        # images in [-1, 1] are the encoder adapter's input after mean = std = 0.5 (set in the demo config)
        tokens = vit.forward_features(x[idx])[:, vit.num_prefix_tokens:]  # (B, N, D)
        pooled = tokens.mean(1)
        loss = sum(F.cross_entropy(heads[k](pooled), labels[k][idx]) for k in HEADS)
        loss = loss + F.cross_entropy(patch_head(tokens).flatten(0, 1), patch_colour[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                acc = {k: (heads[k](pooled).argmax(-1) == labels[k][idx]).float().mean().item() for k in HEADS}
            print(f"step {step} loss {loss.item():.3f} " + " ".join(f"{k}={v:.2f}" for k, v in acc.items())
                  + f" ({time.time() - t0:.0f}s)", flush=True)
    # held-out check: attributes of unseen colour-shape combinations
    xt, lt, _ = load_split(os.path.join(args.data, "test"))
    with torch.no_grad():
        pooled = vit.forward_features(xt)[:, vit.num_prefix_tokens:].mean(1)
        acc = {k: (heads[k](pooled).argmax(-1) == lt[k]).float().mean().item() for k in HEADS}
    print("held-out attribute accuracy: " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, "model.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp)
    os.replace(tmp, os.path.join(args.out, "model.safetensors"))
    with open(os.path.join(args.out, "arch.json"), "w") as f:
        json.dump({**ARCH, "held_out_accuracy": acc}, f, indent=1)
    print(f"stand-in encoder saved to {os.path.join(args.out, 'model.safetensors')}")


if __name__ == "__main__":
    main()
