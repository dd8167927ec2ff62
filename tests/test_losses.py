import math
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision.models._api as tv_api

from vqrae.config import load_config
from vqrae.discriminator import PatchDiscriminator
from vqrae.losses import (
    LossConfig,
    PerceptualLoss,
    _random_lpips,
    adaptive_weight,
    distillation_loss,
    gan_active,
    generator_adv_loss,
    hinge_d_loss,
    reconstruction_loss,
)


pytestmark = pytest.mark.usefixtures("no_downloads")  # tests/conftest.py


@pytest.fixture(scope="module")
def lpips_vgg():
    return PerceptualLoss(net="vgg", backbone="random")


def _images(seed: int, b: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def test_config_defaults_and_override():
    cfg = load_config(LossConfig, None, ["recon=l1", "gan_start_step=10"])
    assert cfg.recon == "l1" and cfg.gan_start_step == 10
    assert cfg.perceptual_weight == LossConfig().perceptual_weight


def test_reconstruction_loss_values():
    pred = torch.tensor([[0.5, -1.0], [0.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert reconstruction_loss(pred, target, "l2").item() == pytest.approx((0.25 + 1.0 + 0.0 + 1.0) / 4)
    assert reconstruction_loss(pred, target, "l1").item() == pytest.approx((0.5 + 1.0 + 0.0 + 1.0) / 4)
    with pytest.raises(ValueError, match="l2"):
        reconstruction_loss(pred, target, "huber")


def test_hinge_losses_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))
    assert generator_adv_loss(fake).item() == pytest.approx(1.0 / 3)
    # a perfect discriminator (margins met on both sides) has zero loss
    assert hinge_d_loss(torch.tensor([1.5, 3.0]), torch.tensor([-1.0, -4.0])).item() == 0.0


def test_adaptive_weight_matches_hand_computed_ratio():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    target = torch.randn(5, 2)
    direction = torch.randn(5, 2)
    last = nn.Linear(3, 2)
    out = last(x)
    nll = (out - target).pow(2).mean()
    g = -(out * direction).mean()
    # d nll / dW = 2/(N*2) (out - t)^T x ; d g / dW = -1/(N*2) direction^T x
    grad_nll = 2.0 / out.numel() * (out - target).detach().t() @ x
    grad_g = -1.0 / out.numel() * direction.t() @ x
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)

    w = adaptive_weight(nll, g, last.weight)
    assert w.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not w.requires_grad
    assert last.weight.grad is None  # nothing is accumulated into .grad
    assert adaptive_weight(nll, g, last.weight, max_weight=1e-3).item() == pytest.approx(1e-3)
    # the graph survives for the caller's backward
    (nll + w * g).backward()
    assert last.weight.grad is not None


def test_adaptive_weight_falls_back_to_one():
    out = nn.Linear(2, 1)(torch.randn(4, 2))
    assert adaptive_weight(out.pow(2).mean(), -out.mean(), None).item() == 1.0
    assert adaptive_weight(out.pow(2).mean(), -out.mean(), torch.empty(0)).item() == 1.0  # ZeRO-3 placeholder


def test_distillation_loss_and_teacher_gets_no_gradient():
    feats = torch.randn(2, 4, 8, requires_grad=True)
    teacher = torch.randn(2, 4, 8, requires_grad=True)
    assert distillation_loss(teacher, teacher.clone()).item() == 0.0
    loss = distillation_loss(feats, teacher)
    assert loss.item() == pytest.approx((feats - teacher).pow(2).mean().item()) and loss.item() > 0
    loss.backward()
    assert teacher.grad is None
    torch.testing.assert_close(feats.grad, 2 * (feats - teacher).detach() / feats.numel())


def test_gan_active_boundary():
    assert not gan_active(9, 10)
    assert gan_active(10, 10) and gan_active(11, 10)


def test_perceptual_random_backbone(lpips_vgg):
    a, b = _images(0), _images(1)
    assert lpips_vgg(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert lpips_vgg(a, b).item() > 1e-3
    assert not any(p.requires_grad for p in lpips_vgg.parameters())
    lpips_vgg.train()
    assert not lpips_vgg.training and not any(m.training for m in lpips_vgg.modules())
    # deterministic in train() too: the heads' dropout stays off
    assert lpips_vgg(a, b).item() == lpips_vgg(a, b).item()
    x = a.clone().requires_grad_(True)
    lpips_vgg(x, b).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_perceptual_on_a_cpu_computes_in_fp32_under_bf16_autocast(lpips_vgg):
    """The trainers' bf16 autocast does not reach the frozen trunk on a CPU (emulated bf16 convolutions there);
    the gradient still reaches the bf16 images."""
    a, b = _images(0), _images(1)
    x = a.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = lpips_vgg(x, b)
    assert value.dtype == torch.float32 and torch.equal(value, lpips_vgg(x.detach().float(), b))
    value.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0


def test_perceptual_loads_local_trunk(tmp_path):
    from safetensors.torch import save_file

    source = PerceptualLoss(net="squeeze", backbone="random")
    with torch.no_grad():  # a trunk unlike the built-in random one, so loading it is visible
        for p in source.lpips.net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    # the same tensors under torchvision's names: features.N.* (sliceK.N.* inside lpips)
    state = {f"features.{k.split('.', 1)[1]}": v.clone() for k, v in source.lpips.net.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(3, 3)  # classifier keys of a full checkpoint are ignored
    path = str(tmp_path / "trunk.safetensors")
    save_file(state, path)
    torch.save(state, tmp_path / "trunk.pth")
    with pytest.raises(ValueError, match="not a .safetensors file"):  # a pickle can run code when loaded
        PerceptualLoss(net="squeeze", backbone=str(tmp_path / "trunk.pth"))

    assert not torch.equal(PerceptualLoss(net="squeeze", backbone="random").lpips.net.slice1[0].weight, source.lpips.net.slice1[0].weight)
    loaded = PerceptualLoss(net="squeeze", backbone=path)
    for k, v in source.lpips.net.state_dict().items():
        torch.testing.assert_close(loaded.lpips.net.state_dict()[k], v, rtol=0, atol=0)
    a, b = _images(2), _images(3)
    torch.testing.assert_close(loaded(a, b), source(a, b))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_perceptual_rejects_incomplete_trunk(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "bad.safetensors")
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="lacks"):
        PerceptualLoss(net="squeeze", backbone=path)
    with pytest.raises(ValueError, match="not found"):
        PerceptualLoss(net="squeeze", backbone=str(tmp_path / "missing.pth"))


def test_perceptual_pretrained_offline_is_one_line_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError) as err:
        PerceptualLoss(net="squeeze", backbone="pretrained")
    assert "\n" not in str(err.value) and "lpips_backbone" in str(err.value)


@pytest.mark.parametrize("size,channels,layers", [(256, 64, 3), (64, 16, 2), (32, 8, 1)])
def test_patch_discriminator_shape(size, channels, layers):
    d = PatchDiscriminator(in_channels=3, channels=channels, layers=layers)
    out = d(torch.randn(2, 3, size, size))
    side = size // 2**layers - 2  # stride-2 blocks, then two 4x4 stride-1 convs with padding 1
    assert out.shape == (2, 1, side, side)


def test_patch_discriminator_init_and_per_sample_norm():
    torch.manual_seed(0)
    d = PatchDiscriminator(channels=32, layers=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    big = torch.cat([c.weight.flatten() for c in convs])
    assert abs(big.std().item() - 0.02) < 2e-3 and abs(big.mean().item()) < 1e-3
    x = torch.randn(4, 3, 64, 64)
    # GroupNorm: a sample's logits do not depend on the rest of the batch
    torch.testing.assert_close(d(x)[:1], d(x[:1]))
    d(x).mean().backward()
    assert all(p.grad is not None for p in d.parameters())
    assert math.isfinite(sum(p.grad.abs().sum().item() for p in d.parameters()))


def test_random_trunk_is_fixed_and_leaves_global_rng_alone():
    # not saved with checkpoints: a resumed run must rebuild the same loss without shifting the training RNG
    _random_lpips.cache_clear()  # the first loss of a process builds the trunk; the next ones copy it
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = PerceptualLoss(net="squeeze", backbone="random")
    assert torch.equal(torch.rand(3), expected)
    b = PerceptualLoss(net="squeeze", backbone="random")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():  # each loss owns its tensors: changing one leaves the next copy as built
        a.lpips.net.slice1[0].weight.add_(1.0)
    c = PerceptualLoss(net="squeeze", backbone="random")
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), c.state_dict().values()))
    _random_lpips.cache_clear()
    fresh = PerceptualLoss(net="squeeze", backbone="random")
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), fresh.state_dict().values()))
