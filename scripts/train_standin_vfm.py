"""Train a small ViT on drawn shapes so the demo has a *semantic* vision encoder offline.

A real VQRAE starts from a pretrained foundation model (SigLIP2, DINOv2). None can be downloaded here, so
the demo first trains a stand-in: a timm ViT that predicts the colour, shape and pixels under each patch from
that patch's token, and every attribute of the picture (colour, shape, size, position, background) from its
pooled tokens, so patch features carry meaning and the detail a pixel decoder needs. The pixel term dominates
(``--pixel-weight`` 50 against ``--attr-weight`` 0.1): with attribute prediction in charge, the patch tokens
spread over global context, a 256-code quantizer of them keeps ~21 dB of the pictures instead of ~24. Like a foundation model that has seen the
world, it learns from freshly drawn pictures of *every* attribute combination; the tokenizer and the MLLM
later train only on the data set's training split, whose held-out combinations they never see. It is
saved as a timm ``model.safetensors``, the format a real encoder is loaded from (``encoder.weights``), so
swapping in SigLIP2 or DINOv2 is a config change only.

    python scripts/train_standin_vfm.py [--out outputs/demo/vfm] [--steps 1000] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from demo import shapes  # noqa: E402

# The architecture the demo tokenizer config names (configs/tokenizer/demo_stage1.yaml: encoder.model_kwargs).
ARCH = dict(name="vit_small_patch16_224", img_size=shapes.IMAGE_SIZE, patch_size=8, embed_dim=96, depth=4, num_heads=4,
            mlp_ratio=2.0)
HEADS = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS), "size": tuple(shapes.SIZES),
         "position": shapes.POSITIONS, "background": tuple(shapes.BACKGROUNDS)}
PALETTE = tuple(shapes.COLOURS) + tuple(shapes.BACKGROUNDS)


def draw(num: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``num`` pictures of any attribute combination: images in [-1, 1], attribute labels, per-patch targets
    (palette colour, and shape or background)."""
    rng = random.Random(seed)
    attrs = [shapes.sample_attrs(rng, "any") for _ in range(num)]
    imgs = np.stack([np.asarray(shapes.render(a, ARCH["img_size"])) for a in attrs])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = {k: torch.tensor([v.index(getattr(a, k)) for a in attrs]) for k, v in HEADS.items()}
    p = ARCH["patch_size"]
    # the shape's colour and identity on every patch the shape covers (>= 25 %), the background elsewhere: dense
    # supervision that names the shape's colour even where the shape fills only part of a patch (the nearest
    # palette colour to a patch's mean would call a half-yellow, half-black patch olive, i.e. gray or green)
    bg = torch.tensor([shapes.BACKGROUNDS[a.background] for a in attrs], dtype=torch.float) / 127.5 - 1
    fg = ((x - bg[:, :, None, None]).abs().amax(1, keepdim=True) > 0.2).float()
    on_shape = F.avg_pool2d(fg, p).flatten(1) >= 0.25  # (B, N)
    shape_colour = torch.tensor([PALETTE.index(a.colour) for a in attrs])[:, None]
    background = torch.tensor([PALETTE.index(a.background) for a in attrs])[:, None]
    patch_colour = torch.where(on_shape, shape_colour, background)
    patch_shape = torch.where(on_shape, labels["shape"][:, None], len(shapes.SHAPES))
    return x, labels, torch.stack([patch_colour, patch_shape], -1)


def to_device(drawn: tuple, device: torch.device) -> tuple:
    """``draw``'s images, label dict and patch targets on ``device``."""
    x, labels, patch_targets = drawn
    return x.to(device), {k: v.to(device) for k, v in labels.items()}, patch_targets.to(device)


def pool(tokens: torch.Tensor) -> torch.Tensor:
    """Mean and max over patches: the max keeps a small shape's signal from drowning in background."""
    return torch.cat([tokens.mean(1), tokens.amax(1)], -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4000, help="pictures drawn for training")
    ap.add_argument("--out", default="outputs/demo/vfm")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--attr-weight", type=float, default=0.1, help="weight of the pooled attribute losses")
    ap.add_argument("--pixel-weight", type=float, default=50.0, help="weight of the per-patch pixel regression")
    ap.add_argument("--patch-weight", type=float, default=1.0, help="weight of the per-patch colour and shape losses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    x, labels, patch_targets = to_device(draw(args.images, args.seed), dev)
    kw = {k: v for k, v in ARCH.items() if k != "name"}
    vit = timm.create_model(ARCH["name"], pretrained=False, num_classes=0, **kw)
    d = vit.num_features
    heads = nn.ModuleDict({k: nn.Linear(2 * d, len(v)) for k, v in HEADS.items()})
    patch_heads = nn.ModuleList([nn.Linear(d, len(PALETTE)), nn.Linear(d, len(shapes.SHAPES) + 1)])
    # each token also predicts its own pixels, so patch features keep the detail a decoder needs
    p = ARCH["patch_size"]
    pixel_head = nn.Linear(d, p * p * 3)
    for m in (vit, heads, patch_heads, pixel_head):
        m.to(dev)
    params = [*vit.parameters(), *heads.parameters(), *patch_heads.parameters(), *pixel_head.parameters()]
    g = ARCH["img_size"] // p
    pixels = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], g * g, 3 * p * p)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (args.batch_size,)).to(dev)
        # images in [-1, 1] are the encoder adapter's input after mean = std = 0.5 (set in the demo config)
        tokens = vit.forward_features(x[idx])[:, vit.num_prefix_tokens:]  # (B, N, D)
        pooled = pool(tokens)
        loss = args.attr_weight * sum(F.cross_entropy(heads[k](pooled), labels[k][idx]) for k in HEADS)
        for j, head in enumerate(patch_heads):
            loss = loss + args.patch_weight * F.cross_entropy(head(tokens).flatten(0, 1), patch_targets[idx][..., j].flatten())
        loss = loss + args.pixel_weight * F.mse_loss(pixel_head(tokens), pixels[idx])
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
    # check on fresh pictures of every combination, the data set's held-out ones included
    xt, lt, pt = to_device(draw(500, args.seed + 1), dev)
    with torch.no_grad():
        tokens = vit.forward_features(xt)[:, vit.num_prefix_tokens:]
        pooled = pool(tokens)
        acc = {k: (heads[k](pooled).argmax(-1) == lt[k]).float().mean().item() for k in HEADS}
        on_shape = pt[..., 1] < len(shapes.SHAPES)  # patches the shape covers
        acc["patch_colour"] = (patch_heads[0](tokens).argmax(-1) == pt[..., 0]).float().mean().item()
        acc["patch_shape"] = (patch_heads[1](tokens).argmax(-1) == pt[..., 1])[on_shape].float().mean().item()
    print("accuracy on fresh pictures: " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, "model.safetensors.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}, tmp)
    os.replace(tmp, os.path.join(args.out, "model.safetensors"))
    with open(os.path.join(args.out, "arch.json"), "w") as f:
        json.dump({**ARCH, "accuracy": acc}, f, indent=1)
    print(f"stand-in encoder saved to {os.path.join(args.out, 'model.safetensors')}")


if __name__ == "__main__":
    main()
