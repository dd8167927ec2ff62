"""quantizer.init = matched: the codebook starts as a linear image of its random start with the projected
features' mean and covariance."""
import pytest
import torch

from tests.helpers import tiny_vqrae_config, write_images
from vqrae import VQRAE
from vqrae.data import DataConfig
from vqrae.quantizer import QuantizerConfig, SimVQ, VectorQuantizer, build_quantizer
from vqrae.train import calibrate_quantizer


def low_rank_features(n: int, dim: int = 24, rank: int = 4, seed: int = 0) -> torch.Tensor:
    """Anisotropic tokens on a rank-``rank`` subspace (scales 8, 4, 2, 1), a large shared mean, a little noise:
    the shape of encoder features that leaves an isotropic Gaussian codebook mostly unused."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0]  # (dim, rank)
    scales = 2.0 ** -torch.arange(rank, dtype=torch.float32) * 8
    mean = 10 * torch.randn(dim, generator=g)
    latent = torch.randn(n, rank, generator=g) * scales
    return mean + latent @ basis.T + 0.05 * torch.randn(n, dim, generator=g)


def matched(cls, dim=24, k=256, e=32, seed=0):
    torch.manual_seed(seed)
    q = cls(dim, k, e)
    feats = low_rank_features(4096, dim)
    q.calibrate(feats.mean(0), feats.std(0))
    return q, feats


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().double()
    return x.mean(0), torch.cov(x.T, correction=0)


@pytest.mark.parametrize("cls", [SimVQ, VectorQuantizer])
@pytest.mark.parametrize("dim,e", [(24, 32), (32, 32), (24, 8)])  # e > D (rank-deficient latents), identity proj_in, e < D
def test_codes_have_the_projected_features_mean_and_covariance(cls, dim, e):
    q, feats = matched(cls, dim=dim, e=e)
    base = q.base_codebook.clone() if cls is SimVQ else None
    q.init_codebook_matched(feats)
    z_mean, z_cov = moments(q.project(feats))
    c_mean, c_cov = moments(q.codebook)
    # The map is exact in float64 (both covariances are the samples' own); what is left is the fp32 storage of W
    # and of the latents, ~1e-7 relative, so 1e-4 of the covariance's scale is loose yet far below any real
    # mismatch (the random start is off by 10^2-10^3 in scale and a mean of ~3 per channel).
    scale = z_cov.diagonal().max()
    torch.testing.assert_close(c_cov, z_cov, rtol=0, atol=1e-4 * float(scale))
    torch.testing.assert_close(c_mean, z_mean, rtol=0, atol=1e-4 * float(scale.sqrt()))
    if cls is SimVQ:
        assert torch.equal(q.base_codebook, base)  # only W changed: C' stays the frozen Gaussian


def test_identity_start_is_far_from_the_features():
    """The assertion above can fail: before the init the same moments are far apart."""
    q, feats = matched(SimVQ)
    z_mean, z_cov = moments(q.project(feats))
    c_mean, c_cov = moments(q.codebook)
    assert (c_cov - z_cov).norm() > 0.5 * z_cov.norm()


def test_vq_and_simvq_start_from_the_same_codes():
    sim, feats = matched(SimVQ)
    vq, _ = matched(VectorQuantizer)
    sim.init_codebook_matched(feats)
    vq.init_codebook_matched(feats)
    torch.testing.assert_close(vq.codebook, sim.codebook, rtol=1e-5, atol=1e-6)
    assert torch.equal(vq.proj_in.bias, sim.proj_in.bias)


@pytest.mark.parametrize("cls", [SimVQ, VectorQuantizer])
def test_gradients_keep_their_routing_after_the_init(cls):
    q, feats = matched(cls)
    q.init_codebook_matched(feats)
    out = q(feats[None, :512])
    codebook = q.codebook_transform.weight if cls is SimVQ else q.embedding
    learnable = {"codebook": codebook, "proj_in": q.proj_in.weight}
    g_code = torch.autograd.grad(out.codebook_loss, list(learnable.values()), allow_unused=True)
    g_commit = torch.autograd.grad(out.commit_loss, list(learnable.values()), allow_unused=True)
    assert g_code[0] is not None and g_code[0].abs().sum() > 0 and g_code[1] is None
    assert g_commit[0] is None and g_commit[1] is not None and g_commit[1].abs().sum() > 0
    if cls is SimVQ:
        assert not q.base_codebook.requires_grad


def held_out_use(q, feats) -> int:
    return torch.unique(q(feats[None]).indices).numel()


@pytest.mark.parametrize("cls", [SimVQ, VectorQuantizer])
def test_matched_start_uses_at_least_twice_the_codes_of_the_identity_start(cls):
    q, feats = matched(cls, k=512, e=64)
    held_out = low_rank_features(8192, seed=0)[4096:]  # same distribution, other draws than the 4096 fitted
    identity_use = held_out_use(q, held_out)
    q.init_codebook_matched(feats)
    matched_use = held_out_use(q, held_out)
    assert matched_use >= 2 * identity_use, (matched_use, identity_use)


def test_save_load_keeps_the_matched_codebook(tmp_path):
    torch.manual_seed(0)
    model = VQRAE(tiny_vqrae_config())
    feats = model.encoder(torch.rand(16, 3, 32, 32) * 2 - 1).flatten(0, 1)  # (256, D)
    model.quantizer.calibrate(feats.mean(0), feats.std(0))
    model.quantizer.init_codebook_matched(feats)
    model.save_pretrained(str(tmp_path))
    loaded = VQRAE.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.quantizer.codebook, model.quantizer.codebook)
    assert torch.equal(loaded.quantizer.project(feats), model.quantizer.project(feats))


def test_build_checks_the_matched_init():
    build_quantizer(QuantizerConfig(codebook_size=8, codebook_dim=4, init="matched"), dim=4)
    with pytest.raises(ValueError, match="codebook_size > codebook_dim"):
        build_quantizer(QuantizerConfig(codebook_size=4, codebook_dim=4, init="matched"), dim=4)
    with pytest.raises(ValueError, match="'random', 'kmeans' or 'matched'"):
        build_quantizer(QuantizerConfig(codebook_size=8, codebook_dim=4, init="pca"), dim=4)


@pytest.mark.parametrize("kind", ["simvq", "vq"])
def test_calibrate_quantizer_with_matched_init_on_the_tiny_model(tmp_path, kind):
    write_images(str(tmp_path / "train"))
    cfg = tiny_vqrae_config()
    cfg.quantizer.init, cfg.quantizer.kind = "matched", kind
    torch.manual_seed(0)
    model = VQRAE(cfg)
    base = model.quantizer.base_codebook.clone() if kind == "simvq" else None
    data = DataConfig(source=str(tmp_path), resolution=32, random_crop=False, hflip=False)
    calibrate_quantizer(model, data, batch_size=8, rank=0, world=1, device="cpu")
    with torch.no_grad():
        feats = torch.cat([model.encoder(pixels) for pixels in _batches(data)]).flatten(0, 1)
        z_mean, z_cov = moments(model.quantizer.project(feats))
        c_mean, c_cov = moments(model.quantizer.codebook)
    # calibrate_quantizer fits the same 48 images seen here (one epoch, unshuffled crops), so the match is exact
    scale = float(z_cov.diagonal().max())
    torch.testing.assert_close(c_cov, z_cov, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(c_mean, z_mean, rtol=0, atol=1e-4 * scale**0.5)
    if kind == "simvq":
        assert torch.equal(model.quantizer.base_codebook, base)


def _batches(data: DataConfig):
    from vqrae.data import build_dataloader

    loader, _ = build_dataloader(data, 8)
    return [b.pixels for b in loader if b.pixels.shape[0]]
