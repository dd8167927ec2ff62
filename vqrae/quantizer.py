"""SimVQ quantizer: a frozen random base codebook C' mapped through a learned linear W (C = C' W^T).

Only W (and the projections around it) learn, so every code moves together and the whole codebook stays in
use even at large K and high dimension e, where a directly learned codebook collapses. ``VectorQuantizer``
(a plain learned codebook with the same interface) exists for comparison studies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerConfig:
    kind: str = "simvq"  # "simvq" (frozen C' through learned W) or "vq" (learned codebook, for comparison)
    codebook_size: int = 16384  # K
    codebook_dim: int = 1536  # e; the input projection maps the encoder width D to e
    # "random": SimVQ's frozen N(0, 1/e) base codebook. "kmeans": the frozen base is set once, before the first
    # stage-1 step, to k-means centroids of the projected training features (W stays the identity, so C starts
    # on the data). Helps data whose features are far from Gaussian, where a Gaussian cloud of codes leaves
    # most codes unused (the shapes demo: ~90 % of its patches are plain background). "matched": C' stays the
    # random Gaussian, and W is set once, before the first stage-1 step, so that C = C'W^T has the projected
    # training features' mean and covariance (``init_codebook_matched``): from the identity the codes are an
    # isotropic cloud far from the latents and few are ever chosen (docs/codebook_study.md).
    init: str = "random"
    search_chunk: int = 4096  # codes compared per matmul; bounds memory at (tokens x chunk)
    token_chunk: int = 16384  # tokens compared per pass


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, N, D) straight-through codes in the encoder width
    indices: torch.Tensor  # (B, N) int64
    codebook_loss: torch.Tensor  # ||c - sg(z)||^2: moves the codebook (W) toward the features
    commit_loss: torch.Tensor  # ||sg(c) - z||^2: moves the projection (and in stage 2 the encoder) toward the codes
    latents: torch.Tensor  # (B, N, e) projected continuous features z


@torch.no_grad()
def nearest_code(z: torch.Tensor, codebook: torch.Tensor, code_chunk: int = 4096, token_chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest code by squared L2 for each row of z (M, e) against codebook (K, e).

    Distances are expanded as ||c||^2 - 2 z.c (||z||^2 is constant per row) and computed in fp32 chunk by
    chunk, keeping a running minimum, so memory is bounded by token_chunk x code_chunk for any K.
    """
    z = z.float()
    codebook = codebook.float()
    with torch.autocast(device_type=z.device.type, enabled=False):
        c_sq = codebook.pow(2).sum(-1)  # (K,)
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for t0 in range(0, z.shape[0], token_chunk):
            zt = z[t0 : t0 + token_chunk]
            best = torch.full((zt.shape[0],), float("inf"), device=z.device)
            best_idx = torch.zeros(zt.shape[0], dtype=torch.long, device=z.device)
            for k0 in range(0, codebook.shape[0], code_chunk):
                # addmm: c_sq - 2 z c^T in one fused kernel
                d = torch.addmm(c_sq[k0 : k0 + code_chunk].unsqueeze(0), zt, codebook[k0 : k0 + code_chunk].t(), alpha=-2.0)
                val, idx = d.min(dim=1)
                better = val < best  # strict: ties keep the lower index, as argmin does
                best = torch.where(better, val, best)
                best_idx = torch.where(better, idx + k0, best_idx)
            out[t0 : t0 + token_chunk] = best_idx
    return out


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means of the rows of x (M, e) -> centroids (k, e), in fp32.

    Seeded by k-means++ (each next centroid drawn with probability proportional to its squared distance from
    the chosen ones); a cluster left empty is re-seeded with a random row, so every centroid ends up in use
    on x when x has at least k distinct rows.
    """
    x = x.float()
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} samples, got {x.shape[0]}")
    first = int(torch.randint(0, x.shape[0], (1,), generator=generator))
    centroids = x.new_empty(k, x.shape[1])
    centroids[0] = x[first]
    min_d2 = (x - x[first]).pow(2).sum(-1)
    for i in range(1, k):
        probs = min_d2.cpu() if float(min_d2.sum()) > 0 else torch.ones(x.shape[0])
        pick = int(torch.multinomial(probs.double(), 1, generator=generator))
        centroids[i] = x[pick]
        min_d2 = torch.minimum(min_d2, (x - x[pick]).pow(2).sum(-1))
    for _ in range(iters):
        assign = nearest_code(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        reseed = x[torch.randint(0, x.shape[0], (k,), generator=generator, device="cpu").to(x.device)]
        centroids = torch.where(empty[:, None], reseed, sums / counts.clamp_min(1)[:, None].to(x.dtype))
    return centroids


@torch.no_grad()
def matching_map(base: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear map W (e, e) whose image ``base @ W.T`` of the codes base (K, e) has the covariance of the rows
    of z (M, e), and that image's mean (e,); float64.

    W = Sigma_z^(1/2) Sigma_base^(-1/2) (symmetric roots), with both covariances the samples' own (population
    form), so the match is exact for this base rather than only in expectation over Gaussian draws. Sigma_z may
    be singular (latents of D-wide tokens span at most D dimensions of R^e); Sigma_base must not be, hence
    K > e.
    """
    k, e = base.shape
    if k <= e:
        raise ValueError(f"a matched codebook needs codebook_size > codebook_dim (a full-rank base), got K={k}, e={e}")
    base, z = base.double(), z.double()

    def root(cov: torch.Tensor, power: float) -> torch.Tensor:
        lam, u = torch.linalg.eigh(cov)
        return (u * lam.clamp_min(0 if power > 0 else 1e-300).pow(power)) @ u.T

    w = root(torch.cov(z.T, correction=0), 0.5) @ root(torch.cov(base.T, correction=0), -0.5)
    return w, base.mean(0) @ w.T


@dataclass
class FeatureStats:
    """Per-channel count, mean and sum of squared deviations (M2) of features, in float64.

    Merged batch by batch and rank by rank with Chan et al.'s pairwise update, never as E[x^2] - mean^2: a
    channel with mean 1e3 and std 1e-2 has E[x^2] - mean^2 below fp32 resolution (std 0), and even float64 loses
    digits to that cancellation as the mean grows.
    """

    count: torch.Tensor  # () float64
    mean: torch.Tensor  # (D,) float64
    m2: torch.Tensor  # (D,) float64

    @classmethod
    def of(cls, x: torch.Tensor) -> "FeatureStats":
        """Statistics of the rows of x (M, D), two-pass in float64."""
        x = x.detach().double()
        mean = x.mean(0)
        return cls(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), mean, (x - mean).pow(2).sum(0))

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        return FeatureStats(n, mean, self.m2 + other.m2 + delta.pow(2) * (self.count * other.count / n))

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population std, as float32."""
        return self.mean.float(), (self.m2 / self.count).sqrt().float()


def check_finite_features(x: torch.Tensor, what: str = "features") -> None:
    """Raise ``ValueError`` when a feature row holds NaN or inf: its nearest code would be meaningless
    (every distance NaN), and the search would silently answer code 0."""
    bad = ~torch.isfinite(x).all(dim=-1)
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} of {bad.numel()} {what} rows hold NaN or inf values")


class SimVQ(nn.Module):
    """SimVQ with input/output projections.

    With z the projected encoder token and c its code, the quantizer loss is
    ``||sg(c) - z||^2 + beta ||c - sg(z)||^2`` with beta = 0.25: the commitment term, which moves the encoder
    side (projection, and the encoder in stage 2) toward its code, weighs 1; the codebook term, which moves
    the codebook (W) toward the encoder, weighs beta, so the features are pulled toward the codes rather than
    the shared codebook chasing every batch. ``forward`` returns both terms unweighted; the training step
    applies ``loss.commit_weight`` (1.0) and ``loss.codebook_weight`` (0.25).

    Everything here runs in fp32 with autocast off, whatever the surrounding precision: the search must find
    the exact nearest code, and C = C'W^T in bf16 would move codes by more than the gaps between them.

    Args:
        dim: encoder width D.
        codebook_size: K.
        codebook_dim: e; projections D->e and e->D are identities when D == e.
        search_chunk: codes per distance matmul.
        token_chunk: tokens per distance pass.
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int, search_chunk: int = 4096, token_chunk: int = 16384):
        super().__init__()
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.search_chunk, self.token_chunk = search_chunk, token_chunk
        self.proj_in = nn.Linear(dim, codebook_dim) if dim != codebook_dim else nn.Identity()
        self.proj_out = nn.Linear(codebook_dim, dim) if dim != codebook_dim else nn.Identity()
        self._init_feature_stats(dim)
        # C' ~ N(0, 1/e), frozen: a persistent buffer, saved with the model so codes keep their meaning.
        self.register_buffer("base_codebook", torch.randn(codebook_size, codebook_dim) * codebook_dim**-0.5)
        self.codebook_transform = nn.Linear(codebook_dim, codebook_dim, bias=False)  # W
        nn.init.eye_(self.codebook_transform.weight)  # C = C' at start; W then learns the shared rotation/scale

    def _init_feature_stats(self, dim: int) -> None:
        # Per-channel statistics of the encoder's features, set once by ``calibrate`` before training. VFM
        # features share a large mean direction (|mean| ~ 10x the per-channel spread): unstandardised, every
        # token lands on the few codes aligned with it and the codebook collapses. Saved with the model.
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))

    @torch.no_grad()
    def calibrate(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the feature statistics (per channel, over a sample of the training data; ``FeatureStats``)."""
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("quantizer calibration: the feature statistics are not finite (the encoder produced NaN or inf)")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    @property
    def codebook(self) -> torch.Tensor:
        """Effective codebook C = C' W^T, (K, e)."""
        return self.codebook_transform(self.base_codebook)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes C[indices] (..., e) as W applied to the gathered base rows C'[indices]: equal to indexing
        ``codebook`` up to fp32 rounding, at the cost of the rows asked for instead of all K."""
        return self.codebook_transform(F.embedding(indices, self.base_codebook))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features (..., D) -> standardised and projected latents z (..., e)."""
        return self.proj_in((x - self.feature_mean) / self.feature_std)

    @torch.no_grad()
    def set_codebook(self, codes: torch.Tensor) -> None:
        """Make the effective codebook C equal ``codes`` (K, e) by changing only the frozen base: C' = C W^-T."""
        w = self.codebook_transform.weight.float()
        self.base_codebook.copy_(torch.linalg.solve(w, codes.float().t()).t())

    @torch.no_grad()
    def init_codebook_kmeans(self, features: torch.Tensor, iters: int = 20, generator: torch.Generator | None = None) -> None:
        """Set the effective codebook to k-means centroids of the projected ``features`` (M, D), after
        ``calibrate``; W keeps its value and role."""
        self.set_codebook(kmeans(self.project(features.to(self.feature_mean)), self.codebook_size, iters, generator))

    @torch.no_grad()
    def init_codebook_matched(self, features: torch.Tensor) -> None:
        """Start the codebook on the projected ``features`` (M, D), after ``calibrate``: W is set so that the codes
        C = C'W^T have the latents' covariance (``matching_map``), and the latents are shifted onto the codes'
        mean. C' is left as it was, so C stays a linear image of a Gaussian, as SimVQ's codebook always is.

        The mean is matched on the encoder side because W has no bias: proj_in's bias (or, when proj_in is the
        identity, ``feature_mean``) moves by the latents' mean minus the codes' (~0, as C' is centred), which
        leaves the latents' covariance unchanged.
        """
        z = self.project(features.to(self.feature_mean))  # (M, e)
        w, codes_mean = matching_map(self.base_codebook, z)
        self.codebook_transform.weight.copy_(w)
        self._shift_latents(z.double().mean(0) - codes_mean)

    @torch.no_grad()
    def _shift_latents(self, shift: torch.Tensor) -> None:
        """Make every latent z = project(x) move by -shift (e,)."""
        if isinstance(self.proj_in, nn.Linear):
            self.proj_in.bias.sub_(shift.to(self.proj_in.bias))
        else:  # z = (x - feature_mean) / feature_std
            self.feature_mean.add_((self.feature_std.double() * shift).to(self.feature_mean))

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """x (B, N, D) continuous features -> straight-through quantized features and losses (all fp32)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.project(x.float())  # (B, N, e)
            with torch.no_grad():  # the search needs every code, but no gradient through all K of them
                codebook = self.codebook  # (K, e)
            indices = nearest_code(z.reshape(-1, z.shape[-1]).detach(), codebook, self.search_chunk, self.token_chunk)
            # The same codes, recomputed from the rows in use only: W's gradient then costs M e^2, not K e^2, and
            # no (K, e) gradient buffer is made. The codebook term still trains W through them.
            q = self.lookup(indices).view_as(z)  # (B, N, e)
            codebook_loss = F.mse_loss(q, z.detach())  # ||c - sg(z)||^2: gradient reaches W only
            commit_loss = F.mse_loss(z, q.detach())  # ||sg(c) - z||^2: gradient reaches the projection/encoder only
            q_st = z + (q - z).detach()  # straight-through estimator
            quantized = self.proj_out(q_st)
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.view(z.shape[:-1]),
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
            latents=z,
        )

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, N) indices -> (B, N, D) features, the exact inverse used to decode generated codes."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.proj_out(self.lookup(indices))


class VectorQuantizer(SimVQ):
    """Plain VQ: the codebook itself is learned (no frozen base, no W). Same interface as ``SimVQ``.

    Args: as ``SimVQ``.
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int, search_chunk: int = 4096, token_chunk: int = 16384):
        nn.Module.__init__(self)
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.search_chunk, self.token_chunk = search_chunk, token_chunk
        self.proj_in = nn.Linear(dim, codebook_dim) if dim != codebook_dim else nn.Identity()
        self.proj_out = nn.Linear(codebook_dim, dim) if dim != codebook_dim else nn.Identity()
        self._init_feature_stats(dim)
        self.embedding = nn.Parameter(torch.randn(codebook_size, codebook_dim) * codebook_dim**-0.5)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.embedding)

    @torch.no_grad()
    def set_codebook(self, codes: torch.Tensor) -> None:
        self.embedding.copy_(codes)

    @torch.no_grad()
    def init_codebook_matched(self, features: torch.Tensor) -> None:
        """As ``SimVQ.init_codebook_matched``, with the random initial table in the role of C': the table becomes
        its own linear image with the latents' covariance. From the same seed both kinds start with equal codes."""
        z = self.project(features.to(self.feature_mean))
        w, codes_mean = matching_map(self.embedding, z)
        self.embedding.copy_(self.embedding.double() @ w.T)
        self._shift_latents(z.double().mean(0) - codes_mean)


def build_quantizer(cfg: QuantizerConfig, dim: int) -> SimVQ:
    kinds = {"simvq": SimVQ, "vq": VectorQuantizer}
    if cfg.kind not in kinds:
        raise ValueError(f"quantizer.kind must be one of {sorted(kinds)}, got '{cfg.kind}'")
    if cfg.init not in ("random", "kmeans", "matched"):
        raise ValueError(f"quantizer.init must be 'random', 'kmeans' or 'matched', got '{cfg.init}'")
    if cfg.init == "matched" and cfg.codebook_size <= cfg.codebook_dim:
        raise ValueError(f"quantizer.init 'matched' needs codebook_size > codebook_dim, got {cfg.codebook_size}, {cfg.codebook_dim}")
    if cfg.codebook_size < 2 or cfg.codebook_dim < 1:
        raise ValueError(f"quantizer needs codebook_size >= 2 and codebook_dim >= 1, got {cfg.codebook_size}, {cfg.codebook_dim}")
    return kinds[cfg.kind](dim, cfg.codebook_size, cfg.codebook_dim, cfg.search_chunk, cfg.token_chunk)
