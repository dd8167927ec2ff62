import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from tests.helpers import tiny_vqrae_config
from vqrae import VQRAE
from vqrae.evaluate import build_eval_loader, eval_data_config, evaluate
from vqrae.losses import PerceptualLoss
from vqrae.metrics import ReconstructionMetrics, psnr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "eval_tokenizer.py")
METRIC_KEYS = {"psnr", "ssim", "lpips", "rfid", "codebook_usage_pct", "perplexity", "images_per_s", "count"}
SIZES = [(32, 32), (48, 40), (40, 64), (37, 33), (32, 32)]  # (w, h): crops and resizes both happen


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """An imagefolder with a ``test`` split of five small images of different shapes."""
    root = tmp_path_factory.mktemp("images")
    os.makedirs(root / "test")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "test" / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("model"))
    VQRAE(tiny_vqrae_config()).save_pretrained(path)
    return path


def _loader(image_dir, batch_size=2, limit=None):
    return build_eval_loader(eval_data_config(image_dir, "test", 32), batch_size, limit)


@pytest.fixture(scope="module")
def loader(image_dir):
    return _loader(image_dir)


@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(0)
    return PerceptualLoss("squeeze", "random")


@dataclass
class _Out:
    reconstruction: torch.Tensor
    indices: torch.Tensor


class _Shifted(nn.Module):
    """Reconstructs its input plus ``offset`` (before the clamp) and emits code = batch position."""

    image_size, codebook_size = 32, 8

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, images):
        b = images.shape[0]
        return _Out(images + self.offset, torch.arange(b).view(b, 1).expand(b, 4))


def test_evaluate_tiny_vqrae_all_metrics_finite(loader, model_dir, lpips_random):
    model = VQRAE.from_pretrained(model_dir).train()
    seen = []
    res = evaluate(model, loader, perceptual=lpips_random, progress=seen.append)
    assert METRIC_KEYS <= set(res)
    assert res["count"] == len(SIZES) and sum(seen) == len(SIZES) and res["skipped"] == 0
    assert res["rfid"] is None
    for key in METRIC_KEYS - {"rfid"}:
        assert math.isfinite(res[key]), key
    assert 0 < res["codebook_usage_pct"] <= 100 and 1 <= res["perplexity"] <= model.codebook_size
    # the same numbers as computing the codes directly over the whole set
    images = torch.cat([b.pixels for b in loader])
    with torch.no_grad():
        codes = model.tokenize(images).flatten()
        recon = model(images).reconstruction.clamp(-1, 1)
    assert res["codebook_usage_pct"] == pytest.approx(100 * codes.unique().numel() / model.codebook_size)
    assert res["psnr"] == pytest.approx(psnr(recon, images).item(), rel=1e-5)
    assert model.training  # evaluated in eval mode, then left in the mode it was given


def test_identity_reconstruction_is_perfect():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    m = ReconstructionMetrics()
    m.update(x, x)
    out = m.compute()
    assert math.isinf(out["psnr"]) and out["ssim"] == pytest.approx(1.0)


def test_evaluate_identity_model_and_known_offset(loader, lpips_random):
    same = evaluate(_Shifted(0.0), loader, perceptual=lpips_random)
    assert math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0) and same["lpips"] == pytest.approx(0.0, abs=1e-6)
    # batches of 2 over 5 images: codes 0 and 1 are used, in proportion 3:2 (and 3:2 again)
    assert same["codebook_usage_pct"] == pytest.approx(100 * 2 / 8)
    assert same["perplexity"] == pytest.approx(math.exp(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4))))

    # +0.2 in [-1, 1] is +0.1 in [0, 1], except where the clamp at 1 cuts it short: compare with the truth
    shifted = evaluate(_Shifted(0.2), loader)
    x = torch.cat([b.pixels for b in loader])
    expected = psnr((x + 0.2).clamp(-1, 1), x, reduction="none").mean().item()
    assert shifted["psnr"] == pytest.approx(expected, rel=1e-6)
    assert 20.0 < shifted["psnr"] < 30.0  # about 10 log10(1 / 0.1^2) = 20 dB plus the clamped pixels


class _RecordingFID:
    """Stands in for ``FIDMetric``: keeps what reaches each set (a real Inception would be slow here)."""

    def __init__(self):
        self.sets = {True: [], False: []}

    def update(self, images, real):
        self.sets[real].append(images.clone())

    def compute(self):
        return float(len(self.sets[True]))


def test_rfid_sees_whole_set_of_inputs_and_clamped_reconstructions(loader):
    fid = _RecordingFID()
    res = evaluate(_Shifted(0.5), loader, fid=fid)
    x = torch.cat([b.pixels for b in loader])
    assert res["rfid"] == 3.0  # one update per batch: 2 + 2 + 1 images
    torch.testing.assert_close(torch.cat(fid.sets[True]), x)
    torch.testing.assert_close(torch.cat(fid.sets[False]), (x + 0.5).clamp(-1, 1))


def test_limit_and_short_last_batch(image_dir):
    assert evaluate(_Shifted(0.0), _loader(image_dir, batch_size=4))["count"] == 5  # last batch of 1 kept
    assert evaluate(_Shifted(0.0), _loader(image_dir, batch_size=2, limit=3))["count"] == 3


def _run(*args, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch_home"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120)


def test_script_writes_json(image_dir, model_dir, tmp_path):
    out = tmp_path / "metrics.json"
    proc = _run("--model", model_dir, "--data", image_dir, "--batch-size", "2", "--no-fid", "--lpips-backbone",
                "random", "--lpips-net", "squeeze", "--out", str(out), "--device", "cpu", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert METRIC_KEYS <= set(res) and res["rfid"] is None and res["count"] == len(SIZES)
    for key in METRIC_KEYS - {"rfid"}:
        assert isinstance(res[key], (int, float)) and math.isfinite(res[key]), key
    assert 0 <= res["codebook_usage_pct"] <= 100
    assert res["protocol"]["crop"] == "center" and res["protocol"]["resolution"] == 32
    assert "| PSNR (dB) |" in proc.stdout


def test_script_missing_inception_weights_exits_2_with_one_line(image_dir, model_dir, tmp_path, monkeypatch, capsys):
    from scripts.eval_tokenizer import main

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    args = ["--model", model_dir, "--data", image_dir, "--lpips-backbone", "random", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--inception-weights" in err[0] and str(tmp_path) in err[0]
    assert main([*args, "--inception-weights", str(tmp_path / "absent.pth")]) == 2
    assert "absent.pth" in capsys.readouterr().err
