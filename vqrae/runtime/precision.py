"""One precision design for both trainers: fp32 weights, bf16 compute under autocast (``run.precision``)."""
from __future__ import annotations

import torch

# One design for both trainers. Parameters, gradients and optimizer states are fp32: DeepSpeed runs in its fp32
# mode and its ZeRO partitions hold fp32 master weights. ``run.precision: bf16`` runs every forward pass and loss
# under ``torch.autocast(bfloat16)``: DeepSpeed's ``torch_autocast`` section covers what runs inside an engine's
# forward (and reduces the gradients of linear/conv weights in bf16), ``autocast`` below covers the loss terms
# computed around it. Matrix products and convolutions then run in bf16, while buffers that must stay exact
# (pixel mean/std, SimVQ's frozen base codebook C', the feature statistics) keep fp32 and never meet a bf16
# parameter, which DeepSpeed's bf16 mode would cast (it casts parameters, not buffers). The quantizer turns
# autocast off inside: its projection, codebook C = C'W^T, nearest-code search and loss terms are fp32 whatever
# the precision, so its indices equal the fp32 exact search on the same features. Memory per trained parameter
# equals DeepSpeed's bf16 mode: fp32 weight + fp32 grad + two fp32 Adam moments (16 B) against bf16 weight +
# bf16 grad + fp32 master + two moments (16 B).
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def autocast(precision: str, device: torch.device):
    """The autocast context of ``run.precision`` on ``device`` (a no-op context for fp32)."""
    dtype = COMPUTE_DTYPES[precision]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

