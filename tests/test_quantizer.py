import pytest
import torch
import torch.nn.functional as F

from vqrae.quantizer import QuantizerConfig, SimVQ, VectorQuantizer, build_quantizer, kmeans, nearest_code


def brute_force(z, codebook):
    # float64 full distance matrix: the reference the chunked fp32 search must match
    return ((z.double()[:, None, :] - codebook.double()[None]) ** 2).sum(-1).argmin(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dim,k,e", [(32, 64, 16), (24, 300, 24), (8, 1000, 48)])
def test_indices_equal_brute_force_argmin(seed, dim, k, e):
    torch.manual_seed(seed)
    q = SimVQ(dim, k, e)
    with torch.no_grad():
        q.codebook_transform.weight.copy_(torch.randn(e, e) / e**0.5)  # a non-trivial W
    x = torch.randn(3, 50, dim)
    out = q(x)
    expected = brute_force(q.proj_in(x).reshape(-1, e), q.codebook).view(3, 50)
    assert torch.equal(out.indices, expected)


@pytest.mark.parametrize("code_chunk,token_chunk", [(7, 5), (64, 1000), (1, 3), (1000, 1)])
def test_chunked_search_equals_unchunked(code_chunk, token_chunk):
    torch.manual_seed(0)
    z, cb = torch.randn(200, 12), torch.randn(97, 12)
    full = nearest_code(z, cb, code_chunk=10**6, token_chunk=10**6)
    assert torch.equal(nearest_code(z, cb, code_chunk, token_chunk), full)
    assert torch.equal(full, brute_force(z, cb))


def test_ties_pick_lowest_index_like_argmin():
    cb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert nearest_code(torch.tensor([[2.0, 0.0]]), cb, code_chunk=1).item() == 0


def test_gradients_reach_projection_and_w_not_base_codebook():
    torch.manual_seed(0)
    q = SimVQ(32, 64, 16)
    x = torch.randn(2, 10, 32, requires_grad=True)
    out = q(x)
    (out.quantized.sum() + out.codebook_loss + out.commit_loss).backward()
    assert q.base_codebook.grad is None and not q.base_codebook.requires_grad
    assert "base_codebook" in dict(q.named_buffers())  # frozen and saved, never an optimizer parameter
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0  # straight-through reaches the encoder side


def test_codebook_term_trains_only_w_and_commit_term_only_projection():
    torch.manual_seed(0)
    q = SimVQ(32, 64, 16)
    x = torch.randn(2, 10, 32)
    q(x).codebook_loss.backward()
    assert q.codebook_transform.weight.grad.abs().sum() > 0 and q.proj_in.weight.grad is None
    q.zero_grad(set_to_none=True)
    q(x).commit_loss.backward()
    assert q.proj_in.weight.grad.abs().sum() > 0 and q.codebook_transform.weight.grad is None


def test_loss_equals_formula_on_hand_computed_values():
    q = SimVQ(2, 2, 2)  # identity projections, W = I
    with torch.no_grad():
        q.base_codebook.copy_(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    x = torch.tensor([[[1.0, 1.0], [2.0, 5.0]]])
    out = q(x)
    assert out.indices.tolist() == [[0, 1]]
    # squared errors: (1^2 + 1^2) for token 0, (1^2 + 1^2) for token 1 -> mean over 4 elements = 1.0
    assert out.codebook_loss.item() == pytest.approx(1.0)
    assert out.commit_loss.item() == pytest.approx(1.0)
    assert torch.allclose(out.quantized, torch.tensor([[[0.0, 0.0], [3.0, 4.0]]]))


@pytest.mark.parametrize("cls", [SimVQ, VectorQuantizer])
def test_indices_to_codes_is_exact_inverse(cls):
    torch.manual_seed(0)
    q = cls(32, 64, 16)
    out = q(torch.randn(2, 9, 32))
    assert torch.allclose(q.indices_to_codes(out.indices), out.quantized, atol=1e-6)


def test_base_codebook_statistics_and_state_dict():
    q = SimVQ(8, 4096, 256)
    assert q.base_codebook.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert "base_codebook" in q.state_dict()


def test_build_rejects_unknown_kind():
    with pytest.raises(ValueError, match="quantizer.kind"):
        build_quantizer(QuantizerConfig(kind="rq"), 8)


def test_calibrated_statistics_standardise_the_input_before_projection():
    torch.manual_seed(0)
    q = SimVQ(16, 64, 8)
    x = torch.randn(2, 30, 16) * 3 + 10  # a large shared offset, as VFM features have
    mean, std = x.mean((0, 1)), x.std((0, 1))
    q.calibrate(mean, std)
    out = q(x)
    expected = brute_force(q.proj_in((x - mean) / std).reshape(-1, 8), q.codebook).view(2, 30)
    assert torch.equal(out.indices, expected)
    assert torch.equal(q.state_dict()["feature_mean"], mean)  # saved with the model


def test_kmeans_recovers_separated_clusters_and_uses_every_centroid():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 5, generator=g) * 10
    x = centres[torch.arange(1600) % 16] + 0.01 * torch.randn(1600, 5, generator=g)
    found = kmeans(x, 16, generator=torch.Generator().manual_seed(1))
    assert torch.cdist(found, centres).min(1).values.max() < 0.05  # each centroid sits on a true centre
    assert torch.cdist(centres, found).min(1).values.max() < 0.05  # and each centre has one
    with pytest.raises(ValueError, match="at least k=16"):
        kmeans(x[:10], 16)


@pytest.mark.parametrize("cls", [SimVQ, VectorQuantizer])
def test_kmeans_init_puts_codes_on_the_data_and_keeps_w(cls):
    torch.manual_seed(0)
    q = cls(dim=12, codebook_size=32, codebook_dim=6)
    if cls is SimVQ:  # a non-identity W: only the frozen base may change, C' = C W^-T
        q.codebook_transform.weight.data = torch.randn(6, 6) + 3 * torch.eye(6)
    w_before = q.codebook_transform.weight.clone() if cls is SimVQ else None
    centres = torch.randn(32, 12) * 5
    feats = centres[torch.arange(3200) % 32] + 0.01 * torch.randn(3200, 12)
    q.calibrate(feats.mean(0), feats.std(0))
    random_use = torch.unique(q(feats[None]).indices).numel()
    q.init_codebook_kmeans(feats, generator=torch.Generator().manual_seed(0))
    out = q(feats[None])
    assert torch.unique(out.indices).numel() == 32 > random_use
    assert out.codebook_loss < 1e-3  # every projected feature sits on its code
    if cls is SimVQ:
        assert torch.equal(q.codebook_transform.weight, w_before)


def test_build_rejects_unknown_init():
    with pytest.raises(ValueError, match="quantizer.init must be"):
        build_quantizer(QuantizerConfig(codebook_size=8, codebook_dim=4, init="pca"), dim=4)


@pytest.mark.parametrize("cls", [SimVQ, VectorQuantizer])
def test_under_bf16_autocast_the_quantizer_is_the_fp32_quantizer(cls):
    """The search, codebook and loss terms run in fp32 whatever the surrounding precision (run.precision: bf16)."""
    torch.manual_seed(0)
    q = cls(dim=48, codebook_size=512, codebook_dim=32)
    if cls is SimVQ:  # a W that is not the identity, so C = C'W^T is a real matrix product
        with torch.no_grad():
            q.codebook_transform.weight.add_(0.1 * torch.randn(32, 32))
    x = torch.randn(4, 64, 48)
    ref = q(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
        codes = q.indices_to_codes(out.indices)
    z = q.project(x).reshape(-1, 32)
    assert torch.equal(out.indices.flatten(), torch.cdist(z.double(), q.codebook.double()).argmin(-1))
    assert torch.equal(out.indices, ref.indices)
    assert out.quantized.dtype == out.codebook_loss.dtype == out.commit_loss.dtype == codes.dtype == torch.float32
    torch.testing.assert_close(out.quantized, ref.quantized, rtol=0, atol=0)
    torch.testing.assert_close(codes, q.indices_to_codes(ref.indices), rtol=0, atol=0)


def test_calibrate_refuses_non_finite_statistics():
    q = SimVQ(dim=4, codebook_size=8, codebook_dim=4)
    with pytest.raises(ValueError, match="not finite"):
        q.calibrate(torch.tensor([0.0, float("nan"), 0.0, 0.0]), torch.ones(4))
    assert torch.equal(q.feature_mean, torch.zeros(4))  # nothing half-applied


def test_tokenize_refuses_nan_features_instead_of_code_zero(tiny_config):
    from vqrae import VQRAE

    model = VQRAE(tiny_config).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    images[1, :, :8, :8] = float("nan")
    with pytest.raises(ValueError, match=r"rows hold NaN or inf values"):
        model.tokenize(images)


def _with_random_w(q):
    if isinstance(q, SimVQ) and not isinstance(q, VectorQuantizer):
        with torch.no_grad():
            q.codebook_transform.weight.copy_(torch.randn_like(q.codebook_transform.weight) / q.codebook_dim**0.5)
    return q


@pytest.mark.parametrize("cls", [SimVQ, VectorQuantizer])
def test_indices_to_codes_equals_the_full_codebook_lookup(cls):
    torch.manual_seed(0)
    q = _with_random_w(cls(32, 300, 16))
    indices = torch.randint(0, 300, (3, 40))
    full = q.proj_out(F.embedding(indices, q.codebook))  # all K codes through W, then indexed
    torch.testing.assert_close(q.indices_to_codes(indices), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [SimVQ, VectorQuantizer])
def test_forward_equals_the_full_codebook_formulation_in_value_and_gradient(cls):
    """Codes gathered before W give the indices, outputs and gradients of gathering from C = C'W^T."""
    torch.manual_seed(0)
    q = _with_random_w(cls(32, 300, 16))
    x = torch.randn(2, 50, 32)
    weights = torch.randn(2, 50, 32)  # a loss on the straight-through output with no symmetry to hide errors

    def step(forward):
        q.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        quantized, indices, codebook_loss, commit_loss = forward(xg)
        ((quantized * weights).sum() + 3 * codebook_loss + 5 * commit_loss).backward()
        grads = {n: p.grad.clone() for n, p in q.named_parameters()}
        return (quantized, indices, codebook_loss, commit_loss), {**grads, "x": xg.grad}

    def new(xg):
        out = q(xg)
        return out.quantized, out.indices, out.codebook_loss, out.commit_loss

    def reference(xg):  # the formulation before the gather: index rows of the full codebook, W's graph over all K
        z = q.project(xg)
        codebook = q.codebook
        indices = brute_force(z.detach().reshape(-1, 16), codebook).view(z.shape[:-1])
        c = F.embedding(indices, codebook)
        return q.proj_out(z + (c - z).detach()), indices, F.mse_loss(c, z.detach()), F.mse_loss(z, c.detach())

    (out, grads), (ref, ref_grads) = step(new), step(reference)
    assert torch.equal(out[1], ref[1])
    for a, b in zip(out[:1] + out[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
