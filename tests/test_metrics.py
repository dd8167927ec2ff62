import math
import os
from collections import Counter

import pytest
import torch

from tests.helpers import write_random_inception
from vqrae.losses import PerceptualLoss
from vqrae.metrics import CodebookUsage, FIDMetric, ReconstructionMetrics, psnr, ssim


pytestmark = pytest.mark.usefixtures("no_downloads")  # tests/conftest.py


def _images(seed: int, b: int = 3, size: int = 32, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * (hi - lo) + lo


def _brute_usage(steps: list[list[int]], k: int) -> tuple[float, float]:
    counts = Counter(i for step in steps for i in step)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return len(counts) / k, math.exp(entropy)


# ---- PSNR / SSIM ----

def test_psnr_identical_is_inf():
    x = _images(0)
    assert torch.isinf(psnr(x, x, reduction="none")).all()
    assert math.isinf(psnr(x, x).item())


def test_psnr_known_noise_level():
    target = _images(1, lo=-0.5, hi=0.5)  # stays inside [-1, 1] after the noise, so nothing is clamped
    sign = torch.where(_images(2) > 0, 1.0, -1.0)
    levels = torch.tensor([0.02, 0.1, 0.4]).view(3, 1, 1, 1)
    pred = target + levels * sign
    # in [0, 1] the error per pixel is level / 2
    expected = torch.tensor([10 * math.log10(1.0 / (lv / 2) ** 2) for lv in (0.02, 0.1, 0.4)])
    torch.testing.assert_close(psnr(pred, target, reduction="none"), expected, rtol=1e-4, atol=1e-4)
    assert psnr(pred, target).item() == pytest.approx(expected.mean().item(), rel=1e-4)


def test_ssim_identical_is_one_and_drops_with_noise():
    x = _images(3)
    torch.testing.assert_close(ssim(x, x, reduction="none"), torch.ones(3))
    noisy = (x + 0.3 * _images(4)).clamp(-1, 1)
    assert (ssim(noisy, x, reduction="none") < 0.99).all()
    with pytest.raises(ValueError, match="reduction"):
        ssim(x, x, reduction="sum")


# ---- CodebookUsage ----

def test_codebook_usage_hand_computed():
    u = CodebookUsage(codebook_size=8, window=2)
    assert u.usage() == 0.0 and u.perplexity() == 0.0
    u.update(torch.tensor([[0, 0], [1, 2]]))
    assert u.usage() == 3 / 8
    assert u.perplexity() == pytest.approx(2**1.5)  # p = (1/2, 1/4, 1/4): H = 1.5 ln 2
    u.update(torch.tensor([3, 3]))
    assert u.usage() == 4 / 8  # counts 2, 1, 1, 2
    u.update(torch.tensor([7]))  # evicts the first step
    assert u.usage() == 2 / 8
    assert u.perplexity() == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))
    assert u.histogram().tolist() == [0, 0, 0, 2, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="indices"):
        u.update(torch.tensor([8]))


def test_codebook_usage_window_matches_brute_force():
    k, window = 16, 3
    u = CodebookUsage(k, window)
    g = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(10):
        idx = torch.randint(0, k, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
        u.update(idx)
        steps.append(idx.tolist())
        usage, ppl = _brute_usage(steps[-window:], k)
        assert u.usage() == pytest.approx(usage) and u.perplexity() == pytest.approx(ppl)


def test_codebook_usage_state_round_trip():
    u = CodebookUsage(32, window=4)
    for s in range(6):
        u.update(torch.randint(0, 32, (20,), generator=torch.Generator().manual_seed(s)))
    restored = CodebookUsage(32, window=4)
    restored.load_state_dict(u.state_dict())
    assert torch.equal(restored.histogram(), u.histogram())
    assert restored.perplexity() == u.perplexity()
    # after resuming, the oldest step is evicted exactly as it would have been
    nxt = torch.randint(0, 32, (20,), generator=torch.Generator().manual_seed(99))
    u.update(nxt)
    restored.update(nxt)
    assert torch.equal(restored.histogram(), u.histogram())

    smaller = CodebookUsage(32, window=1)
    smaller.load_state_dict(u.state_dict())
    assert smaller.histogram().tolist() == torch.bincount(nxt, minlength=32).tolist()
    with pytest.raises(ValueError, match="codes"):
        CodebookUsage(64, window=4).load_state_dict(u.state_dict())


# ---- ReconstructionMetrics ----

def test_reconstruction_metrics_accumulate_over_batches():
    torch.manual_seed(0)
    lp = PerceptualLoss(net="squeeze", backbone="random")
    m = ReconstructionMetrics(codebook_size=8, perceptual=lp)
    with pytest.raises(ValueError, match="no images"):
        m.compute()
    targets = [_images(10, b=2), _images(11, b=3)]
    preds = [(t + 0.1 * _images(20 + i, b=t.shape[0])).clamp(-1, 1) for i, t in enumerate(targets)]
    indices = [torch.tensor([[0, 1], [1, 1]]), torch.tensor([[2, 2], [2, 2], [0, 0]])]
    for p, t, i in zip(preds, targets, indices):
        m.update(p, t, i)
    out = m.compute()

    pred, target = torch.cat(preds), torch.cat(targets)
    assert out["count"] == 5
    assert out["psnr"] == pytest.approx(psnr(pred, target).item(), rel=1e-6)
    assert out["ssim"] == pytest.approx(ssim(pred, target).item(), rel=1e-6)
    per_image_lpips = torch.stack([lp(pred[j : j + 1], target[j : j + 1]) for j in range(5)])
    assert out["lpips"] == pytest.approx(per_image_lpips.mean().item(), rel=1e-5)
    assert out["codebook_usage"] == 3 / 8
    assert out["perplexity"] == pytest.approx(_brute_usage([[0, 1, 1, 1, 2, 2, 2, 2, 0, 0]], 8)[1])

    # two ranks holding the same data: sums double, means stay
    m.all_reduce(lambda t: t.mul_(2))
    doubled = m.compute()
    assert doubled["count"] == 10 and doubled["psnr"] == pytest.approx(out["psnr"])
    assert doubled["perplexity"] == pytest.approx(out["perplexity"])


def test_reconstruction_metrics_without_codes():
    m = ReconstructionMetrics()
    with pytest.raises(ValueError, match="codebook_size"):
        m.update(_images(0), _images(1), torch.zeros(3, 4, dtype=torch.long))
    m.reset()
    m.update(_images(0), _images(0))
    out = m.compute()
    assert set(out) == {"psnr", "ssim", "count"} and math.isinf(out["psnr"]) and out["ssim"] == pytest.approx(1.0)


# ---- FID ----

def test_fid_without_weights_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    with pytest.raises(ValueError) as err:
        FIDMetric()
    msg = str(err.value)
    assert "\n" not in msg and "--inception-weights" in msg and str(tmp_path) in msg
    with pytest.raises(ValueError, match="not found"):
        FIDMetric(str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("content", ["garbage", "wrong_keys"])
def test_fid_unloadable_weights_is_one_line_error(tmp_path, content):
    from safetensors.torch import save_file

    path = tmp_path / "inception.safetensors"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        save_file({"conv.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError) as err:
        FIDMetric(str(path))
    assert "\n" not in str(err.value) and "--inception-weights" in str(err.value)


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """A randomly initialised torch-fidelity InceptionV3 saved as a state dict, built without any download."""
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    return str(path), write_random_inception(str(path))


def test_fid_local_weights_and_update_routing(random_inception_file):
    path, state = random_inception_file
    fid = FIDMetric(path)
    loaded = fid.fid.inception.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    real, fake = _images(30, b=1), _images(31, b=2)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert fid.fid.real_features_num_samples.item() == 1 and fid.fid.fake_features_num_samples.item() == 2
    # [-1, 1] images reach Inception as the uint8 images they would be saved as
    as_uint8 = ((real + 1) / 2 * 255).round().to(torch.uint8)
    with torch.no_grad():
        expected = fid.fid.inception(as_uint8).double().sum(0)
    torch.testing.assert_close(fid.fid.real_features_sum, expected)
    assert fid.fid.real_features_sum.abs().max() > 1e-3
    fid.reset()
    assert fid.fid.real_features_num_samples.item() == 0


def _real_inception_weights() -> str | None:
    path = os.environ.get("VQRAE_INCEPTION_WEIGHTS") or os.path.join(torch.hub.get_dir(), "checkpoints", "weights-inception-2015-12-05-6726825d.pth")
    return path if os.path.isfile(path) else None


@pytest.mark.skipif(
    _real_inception_weights() is None,
    reason="real Inception weights absent: set VQRAE_INCEPTION_WEIGHTS or place weights-inception-2015-12-05-6726825d.pth in the torch hub cache",
)
def test_fid_real_weights():
    fid = FIDMetric(_real_inception_weights())
    a, b = _images(40, b=4), _images(41, b=4, lo=-1.0, hi=0.0)
    fid.update(a, real=True)
    fid.update(a, real=False)
    same = fid.compute()
    fid.reset()
    fid.update(a, real=True)
    fid.update(b, real=False)
    different = fid.compute()
    assert abs(same) < 1e-2 and different > 1.0
