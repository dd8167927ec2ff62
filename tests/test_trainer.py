import copy
import os

import pytest
import torch

from vqrae import VQRAE
from vqrae.losses import LossConfig
from vqrae.train import TokenizerTrainConfig, build_discriminator, feature_stats, make_teacher, merge_stats, set_stage, tokenizer_param_groups
from vqrae.losses import discriminator_loss, generator_loss
from vqrae.runtime.checkpoint import Checkpointer, rng_state, set_rng_state
from vqrae.runtime.config import OptimConfig, RunConfig, TrainingError, deepspeed_config
from vqrae.runtime.guard import NonFiniteGuard
from vqrae.runtime.optim import EMA, GuardedAdamW, make_optimizer, param_groups

NO_LPIPS = LossConfig(perceptual_weight=0.0, gan_weight=0.0)


def _grads(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_reach_encoder_only_in_stage_2(tiny_config, stage):
    torch.manual_seed(0)
    model = VQRAE(tiny_config)
    set_stage(model, stage)
    teacher = make_teacher(model.encoder) if stage == 2 else None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    gl = generator_loss(out, x, NO_LPIPS, step=0, teacher_features=teacher(x) if teacher else None)
    gl.total.backward()
    touched = _grads(model)
    enc = {n for n in touched if n.startswith("encoder.")}
    assert bool(enc) == (stage == 2)
    assert "quantizer.codebook_transform.weight" in touched and "quantizer.proj_in.weight" in touched
    assert any(n.startswith("decoder.") for n in touched)
    assert all(p.grad is None for p in (teacher.parameters() if teacher else []))
    assert set(gl.terms) == {"recon", "codebook", "commit"} | ({"distill"} if stage == 2 else set())


def test_distillation_zero_at_init_and_positive_after_encoder_moves(tiny_config):
    torch.manual_seed(0)
    model = VQRAE(tiny_config)
    set_stage(model, 2)
    teacher = make_teacher(model.encoder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert generator_loss(model(x), x, NO_LPIPS, 0, teacher_features=teacher(x)).terms["distill"].item() == 0.0
    opt = torch.optim.SGD(model.encoder.parameters(), lr=0.5)
    model(x).reconstruction.pow(2).mean().backward()
    opt.step()
    assert generator_loss(model(x), x, NO_LPIPS, 0, teacher_features=teacher(x)).terms["distill"].item() > 0


def test_gan_term_starts_at_its_step_and_never_trains_discriminator(tiny_config):
    torch.manual_seed(0)
    cfg = LossConfig(perceptual_weight=0.0, gan_weight=0.1, gan_start_step=5, disc_channels=8, disc_layers=2)
    model, disc = VQRAE(tiny_config), build_discriminator(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = generator_loss(model(x), x, cfg, 4, discriminator=disc, last_layer=model.decoder.last_layer.weight)
    assert "gan" not in before.terms and before.gan_weight == 0.0
    after = generator_loss(model(x), x, cfg, 5, discriminator=disc, last_layer=model.decoder.last_layer.weight)
    assert "gan" in after.terms and after.gan_weight > 0
    after.total.backward()
    assert all(p.grad is None for p in disc.parameters())
    d = discriminator_loss(disc, x, model(x).reconstruction)
    model.zero_grad(set_to_none=True)
    d.backward()
    assert all(p.grad is None for p in model.parameters())  # fakes are detached
    assert any(p.grad is not None for p in disc.parameters())


def test_weighted_total_equals_sum_of_weighted_terms(tiny_config):
    torch.manual_seed(0)
    cfg = LossConfig(perceptual_weight=0.0, gan_weight=0.0, recon_weight=2.0, codebook_weight=0.5, commit_weight=3.0)
    model = VQRAE(tiny_config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    gl = generator_loss(model(x), x, cfg, 0)
    t = gl.terms
    assert gl.total.item() == pytest.approx(2.0 * t["recon"].item() + 0.5 * t["codebook"].item() + 3.0 * t["commit"].item(), rel=1e-5)


def test_param_groups_skip_frozen_and_decay_only_matrices(tiny_config):
    model = VQRAE(tiny_config)
    set_stage(model, 1)
    groups = param_groups(model.named_parameters(), 1e-3, 0.1, "all")
    ids = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in ids for p in model.encoder.parameters())
    decayed = next(g for g in groups if g["weight_decay"] > 0)
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert id(model.decoder.pos_embed) not in {id(p) for p in decayed["params"]}


@pytest.mark.parametrize("stage", [1, 2])
def test_tokenizer_groups_give_each_trainable_parameter_one_lr(tiny_config, stage):
    model = VQRAE(tiny_config)
    set_stage(model, stage)
    cfg = TokenizerTrainConfig(stage=stage, encoder_lr=1e-5, quantizer_lr=2e-4, optim=OptimConfig(lr=2e-3))
    groups = tokenizer_param_groups(model, cfg)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in lr_of, "a parameter in two groups"
            lr_of[id(p)] = g["lr"]
    want = {"decoder": 2e-3, "quantizer": 2e-4, "encoder": 1e-5}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of.pop(id(p)) == want[n.split(".")[0]], n
    assert not lr_of  # nothing frozen slipped in
    cfg.quantizer_lr = None
    q_lrs = {g["lr"] for g in tokenizer_param_groups(model, cfg) if g["name"].startswith("quantizer")}
    assert q_lrs == {2e-3}


def test_deepspeed_config_accumulation_and_errors():
    cfg = deepspeed_config(RunConfig(batch_size=64, micro_batch_size=8), OptimConfig(grad_clip=0.5), world_size=2)
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 0.5
    # bf16 is autocast over fp32 master weights, never DeepSpeed's bf16 mode (which casts parameters, not buffers)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not cfg["bf16"]["enabled"]
    fp32 = deepspeed_config(RunConfig(batch_size=8, micro_batch_size=8, precision="fp32"), OptimConfig(), 1)
    assert not fp32["torch_autocast"]["enabled"] and not fp32["bf16"]["enabled"]
    with pytest.raises(TrainingError, match="not divisible"):
        deepspeed_config(RunConfig(batch_size=10, micro_batch_size=4), OptimConfig(), world_size=1)
    with pytest.raises(TrainingError, match="precision"):
        deepspeed_config(RunConfig(batch_size=8, micro_batch_size=8, precision="fp16x"), OptimConfig(), 1)


def test_deepspeed_json_overrides_zero_stage(tmp_path):
    run = RunConfig(batch_size=8, micro_batch_size=8, zero_stage=1, deepspeed_config="configs/deepspeed/zero3.json")
    cfg = deepspeed_config(run, OptimConfig(), 1)
    assert cfg["zero_optimization"]["stage"] == 3 and run.zero_stage == 1  # the argument is left as it was


def test_deepspeed_json_cannot_switch_precision_behind_run_precision(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"bf16": {"enabled": true}}')
    run = RunConfig(batch_size=8, micro_batch_size=8, deepspeed_config=str(path))
    with pytest.raises(TrainingError, match=r"sets 'bf16'; set run.precision \(bf16 or fp32\) instead"):
        deepspeed_config(run, OptimConfig(), 1)


def test_ema_tracks_trainable_params_only(tiny_config):
    model = VQRAE(tiny_config)
    set_stage(model, 1)
    ema = EMA(model, decay=0.5)
    assert not any(n.startswith("encoder.") for n in ema.shadow)
    before = ema.shadow["decoder.last_layer.bias"].clone()
    with torch.no_grad():
        model.decoder.last_layer.bias.add_(2.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["decoder.last_layer.bias"], before + 1.0)
    sd = ema.state_dict_for(model)
    assert torch.equal(sd["encoder.model.patch_embed.proj.weight"], model.encoder.model.patch_embed.proj.weight)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_checkpointer_ignores_incomplete_and_prunes(tmp_path):
    ck = Checkpointer(str(tmp_path), keep_last=2, rank=0)
    for step in (1, 2, 3):
        tmp = ck.tmp_dir(step)
        open(os.path.join(tmp, "w.bin"), "w").write("x")
        ck.commit(tmp, step)
    ck.tmp_dir(4)  # a crash mid-write leaves a temp folder behind
    done = ck.complete()
    assert [os.path.basename(p) for p in done] == ["step_00000002", "step_00000003"]
    assert ck.resolve("auto") == done[-1]
    assert ck.resolve(None) is None
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        ck.resolve(str(tmp_path / "checkpoints" / ".tmp-step_00000004"))


def _steps(guard, losses, start=1):
    """One micro-step per optimizer step: observe, arm and record each loss."""
    for step, loss in enumerate(losses, start=start):
        guard.observe(torch.tensor(loss))
        guard.record(step, guard.arm())


def test_nonfinite_guard_flags_on_the_device_and_settles_at_the_read():
    nan, inf = float("nan"), float("inf")
    g, lines = NonFiniteGuard(max_consecutive=3), []
    _steps(g, [1.0, nan, inf, 2.0, nan, nan])
    assert g.total == 0 and len(g.pending) == 6  # nothing is read back before the log or checkpoint
    assert g.pending_flags().tolist() == [0, 1, 1, 0, 1, 1]
    assert not g.clear_to_save(6, "ck/step_4", lines.append)  # a save waits out a run of skipped steps
    assert lines == ["step 2: non-finite loss skipped (1 so far)", "step 3: non-finite loss skipped (2 so far)",
                     "step 5: non-finite loss skipped (3 so far)", "step 6: non-finite loss skipped (4 so far)",
                     "step 6: checkpoint postponed: the last 2 steps had non-finite losses"]
    _steps(g, [3.0], start=7)
    assert g.clear_to_save(7, "ck/step_4", lines.append) and g.total == 4 and g.consecutive == 0
    _steps(g, [nan, nan, nan, 1.0], start=8)
    with pytest.raises(TrainingError, match="^3 non-finite losses in a row at step 10; last good checkpoint: ck/step_7$"):
        g.settle(g.pending_flags().tolist(), "ck/step_7", lines.append)


def test_nonfinite_guard_flags_a_whole_accumulated_step_and_names_broken_encoder_features():
    g = NonFiniteGuard(max_consecutive=5)
    g.observe(torch.tensor(1.0))
    g.observe(torch.tensor(float("nan")))  # the second micro-step of the same optimizer step
    assert g.arm().item() == 1 and g.arm().item() == 0  # arm starts the next step's window
    g.observe(torch.tensor(float("nan")), features=torch.tensor([[0.0, float("inf")]]))
    g.record(1, g.arm())
    with pytest.raises(TrainingError, match="^step 1: the encoder produced NaN or inf features"):
        g.read("ck/a", lambda msg: None)
    g.observe(torch.tensor(2.0), features=torch.tensor([[0.0, float("inf")]]))  # a finite loss is not flagged
    assert g.arm().item() == 0


def _adamw_pair():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 4)
    b = copy.deepcopy(a)
    opt = make_optimizer(param_groups(a.named_parameters(), 0.1, 0.01, "m"), OptimConfig())
    ref = torch.optim.AdamW(param_groups(b.named_parameters(), 0.1, 0.01, "m"), foreach=False)
    return a, b, opt, ref


def test_guarded_adamw_leaves_weights_and_state_alone_on_a_flagged_or_non_finite_step():
    a, b, opt, ref = _adamw_pair()
    assert isinstance(opt, GuardedAdamW)
    grads = [torch.randn(4, 5), torch.randn(4)]

    def step(o, module, g, flag=None):
        for p, gi in zip(module.parameters(), g):
            p.grad = gi.clone()
        if flag is not None:
            o.skip_if(torch.tensor(float(flag)))
        o.step()

    step(opt, a, grads, flag=0)
    step(ref, b, grads)
    assert opt.skipped.item() == 0
    for p, q in zip(a.parameters(), b.parameters()):  # an unflagged step is AdamW's
        torch.testing.assert_close(p, q)
    before = copy.deepcopy((a.state_dict(), opt.state_dict()["state"]))
    step(opt, a, [g * 3 for g in grads], flag=1)  # flagged by the guard
    assert opt.skipped.item() == 1
    step(opt, a, [g * float("nan") for g in grads], flag=0)  # a non-finite gradient the guard did not see
    assert opt.skipped.item() == 1
    step(opt, a, [g * float("inf") for g in grads])  # unarmed since: still checked
    for k, v in before[0].items():
        assert torch.equal(v, a.state_dict()[k])
    for i, st in before[1].items():  # moments and step counts too
        for k, v in st.items():
            assert torch.equal(v, opt.state_dict()["state"][i][k]), k
    step(opt, a, grads, flag=0)
    step(ref, b, grads)
    for p, q in zip(a.parameters(), b.parameters()):  # the skipped steps never happened
        torch.testing.assert_close(p, q)
    opt.skip_if(torch.tensor(0.0))
    assert opt.skipped.item() == 1  # armed but no step ran (a wrapper dropped it): counted as skipped


def test_guarded_adamw_resumes_a_plain_adamw_state():
    a, b, opt, ref = _adamw_pair()
    grads = [torch.randn(4, 5), torch.randn(4)]
    for o, m in ((opt, a), (ref, b)):
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
    ref.step()
    a.load_state_dict(b.state_dict())
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # written by torch's AdamW, unfused
    assert all(g["fused"] for g in opt.param_groups)
    opt.skip_if(torch.tensor(0.0))
    opt.step()
    ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    assert {float(st["step"]) for st in opt.state.values()} == {2.0}


def test_ema_skips_a_skipped_step_on_the_device():
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, 0.5)
    with torch.no_grad():
        m.weight.add_(1.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(m, torch.tensor(1.0))
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    ema.update(m, torch.tensor(0.0))
    torch.testing.assert_close(ema.state_dict()["weight"], before["weight"] * 0.5 + m.weight.detach() * 0.5)


def test_feature_stats_match_brute_force_across_batches_and_ranks():
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 3), torch.randn(4, 5, 3), torch.randn(1, 5, 3)]
    stats = feature_stats(torch.nn.Identity(), iter(batches))
    flat = torch.cat([b.flatten(0, 1) for b in batches])
    assert stats.count.item() == flat.shape[0]
    mean, std = stats.mean_std()
    torch.testing.assert_close(mean, flat.mean(0))
    torch.testing.assert_close(std, flat.std(0, unbiased=False))
    # ranks merge the same way batches do
    ranks = [feature_stats(torch.nn.Identity(), iter(batches[:2])), feature_stats(torch.nn.Identity(), iter(batches[2:]))]
    torch.testing.assert_close(merge_stats(ranks).mean_std(), (mean, std))
    assert feature_stats(torch.nn.Identity(), iter([])) is None


def test_feature_stats_keep_a_small_spread_around_a_large_mean():
    # E[x^2] - mean^2 in fp32 gives std 0 here, which the quantizer's 1e-6 clamp would blow up 10^4x
    torch.manual_seed(0)
    batches = [1e3 + 1e-2 * torch.randn(4, 64, 2) for _ in range(8)]
    flat = torch.cat([b.flatten(0, 1) for b in batches]).double()
    _, std = feature_stats(torch.nn.Identity(), iter(batches)).mean_std()
    torch.testing.assert_close(std.double(), flat.std(0, unbiased=False), rtol=0.01, atol=0)
    assert ((std - 1e-2).abs() / 1e-2 < 0.05).all()


def test_a_nan_feature_is_a_one_line_error_not_code_zero():
    batch = torch.randn(2, 5, 3)
    batch[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^1 of 10 encoder feature rows hold NaN or inf values$"):
        feature_stats(torch.nn.Identity(), iter([batch]))
