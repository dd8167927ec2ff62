import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.helpers import TINY_TIMM, tiny_vqrae_config
from vqrae import VQRAE, EncoderConfig, VFMEncoder
from vqrae.decoder import DecoderConfig, build_decoder


def _hf_vision_dir(tmp_path, family: str):
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    model = SiglipVisionModel(SiglipVisionConfig(**common)) if family == "siglip" else Dinov2Model(Dinov2Config(**common))
    path = tmp_path / family
    model.save_pretrained(path)
    return str(path), model


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_hf_encoder_loads_saved_weights_and_drops_prefix_tokens(tmp_path, family):
    path, ref = _hf_vision_dir(tmp_path, family)
    enc = VFMEncoder(EncoderConfig(backend="hf", name=path, image_size=28, mean=[0.5] * 3, std=[0.5] * 3)).eval()
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    tokens = enc(x)
    assert tokens.shape == (2, 4, 32)
    with torch.no_grad():
        full = ref.eval()(pixel_values=x).last_hidden_state  # mean/std 0.5 -> pixel values equal x
    assert torch.allclose(tokens, full[:, -4:], atol=1e-5)
    assert enc.cfg.hf_config["model_type"] == ref.config.model_type


def test_timm_encoder_loads_local_weights_file_and_drops_class_token(tmp_path):
    torch.manual_seed(0)
    kw = dict(TINY_TIMM, patch_size=14)
    ref = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, **kw).eval()
    file = tmp_path / "dinov2_tiny.safetensors"
    save_file(ref.state_dict(), str(file))
    enc = VFMEncoder(EncoderConfig(name="vit_base_patch14_dinov2", pretrained=True, weights=str(file), image_size=28, model_kwargs=kw)).eval()
    x = torch.rand(1, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        expected = ref.forward_features(((x + 1) / 2 - enc.mean) / enc.std)[:, 1:]
        assert torch.allclose(enc(x), expected, atol=1e-6)
    assert enc.cfg.mean == pytest.approx([0.485, 0.456, 0.406])  # the model's own pretrained_cfg


def test_encoder_resizes_input_to_its_resolution(tiny_config):
    enc = VFMEncoder(tiny_config.encoder)
    assert enc(torch.zeros(1, 3, 48, 48)).shape == (1, 16, 32)


@pytest.mark.parametrize("backend", ["timm", "hf"])
def test_vqrae_save_load_gives_identical_outputs(tmp_path, backend):
    cfg = tiny_vqrae_config()
    if backend == "hf":
        path, _ = _hf_vision_dir(tmp_path, "siglip")
        cfg.encoder = EncoderConfig(backend="hf", name=path, image_size=28)
        cfg.decoder.patch_size, cfg.decoder.image_size = 16, 32  # p14 grid 2x2 -> 32 px output
    torch.manual_seed(0)
    model = VQRAE(cfg).eval()
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.yaml", "model.safetensors"]
    if backend == "hf":
        os.rename(path, path + "_gone")  # the checkpoint must not need the original model directory
    loaded = VQRAE.from_pretrained(str(tmp_path / "ckpt")).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.reconstruction, b.reconstruction)


def test_save_pretrained_with_explicit_state_dict(tmp_path, tiny_config):
    model = VQRAE(tiny_config)
    sd = {k: torch.zeros_like(v) if k.startswith("decoder.") else v for k, v in model.state_dict().items()}
    model.save_pretrained(str(tmp_path), state_dict=sd)
    loaded = VQRAE.from_pretrained(str(tmp_path))
    assert all(p.abs().sum() == 0 for p in loaded.decoder.parameters())


def test_decoder_patch14_to_patch16_output_shape():
    # DINOv2 p14 at 224 px -> 16x16 tokens -> 256 px with a p16 decoder
    dec = build_decoder(DecoderConfig(depth=1, width=32, num_heads=2, patch_size=16, image_size=256), in_dim=48, grid_size=16, depth=12, width=48, num_heads=4)
    assert dec(torch.randn(2, 256, 48)).shape == (2, 3, 256, 256)


def test_decoder_rejects_incompatible_resolution():
    with pytest.raises(ValueError, match="must equal the token grid"):
        build_decoder(DecoderConfig(patch_size=16, image_size=250), in_dim=8, grid_size=16, depth=1, width=8, num_heads=2)


def test_decoder_defaults_mirror_encoder(tiny_config):
    model = VQRAE(tiny_config)
    assert len(model.decoder.blocks) == model.encoder.depth == 2
    assert model.decoder.norm.normalized_shape[0] == model.encoder.dim


def test_unpatchify_places_each_token_at_its_grid_cell():
    dec = build_decoder(DecoderConfig(depth=0, width=12, num_heads=1, patch_size=2, image_size=4), in_dim=12, grid_size=2, depth=0, width=12, num_heads=1)
    torch.nn.init.zeros_(dec.pos_embed)
    dec.norm = torch.nn.Identity()
    dec.last_layer = torch.nn.Identity()
    tokens = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 12).clone()  # token t filled with value t
    img = dec(tokens)[0, 0]
    assert img.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_decode_indices_matches_forward_reconstruction(tiny_config):
    model = VQRAE(tiny_config).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(model.decode_indices(out.indices), out.reconstruction, atol=1e-5)
        assert torch.equal(model.tokenize(x), out.indices)


def test_a_bf16_weights_file_loads_into_the_fp32_model_it_describes(tmp_path, tiny_config):
    """A checkpoint whose weights were stored in bf16 (by a bf16 trainer or a user's cast) loads as the same model
    in fp32, buffers included; the quantizer's fp32 search then runs on the rounded weights."""
    torch.manual_seed(0)
    model = VQRAE(tiny_config).eval()
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(str(tmp_path / "ckpt"), state_dict=bf16)
    loaded = VQRAE.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.float32}
    rounded = VQRAE(tiny_config).eval()
    rounded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in bf16.items()})
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x).indices, rounded(x).indices)
        assert torch.equal(loaded(x).reconstruction, rounded(x).reconstruction)
