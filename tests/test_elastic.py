"""A run survives the cluster: pre-emption signals, resuming on another number of ranks (``vqrae.runtime.elastic``).

The rank-count tests launch ``tests/launch_worker.py`` three times (2 ranks, then 1, then 2 again) over every
ZeRO stage of the tokenizer's two stages and the unified model, each stopped through the pre-emption path; the
first launch also trains the ZeRO-3 test's runs and the run the signal test compares with. The signal test sends
real signals to real ``deepspeed`` ranks.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import copy_checkpoint, reference_argv
from tests.helpers import (deepspeed_cmd, launch_runs, launcher_env, run_outcomes, run_script, write_images,
                           write_tiny_assets, write_vqrae)
from vqrae import cli
from vqrae.runtime import elastic
from vqrae.runtime.config import OptimConfig, RunConfig, TrainingError, check_run_config, world_sizes
from vqrae.runtime.elastic import PREEMPTED_EXIT, Preempted, StopSignals, rank_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = {1: "configs/tokenizer/tiny_stage1.yaml", 2: "configs/tokenizer/tiny_stage2.yaml"}
# GAN from the first step (its engine is re-split too); no LPIPS (its random VGG trunk dominates a CPU step)
FAST = ["loss.perceptual_weight=0", "loss.gan_start_step=0", "run.tensorboard=false", "run.image_every=0"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("elastic"))
    write_images(os.path.join(root, "images", "train"), n=48)
    return {"images": os.path.join(root, "images"), "stage1": write_vqrae(os.path.join(root, "stage1")),
            **write_tiny_assets(os.path.join(root, "mllm"), num_train=48)}


# ----------------------------------------------------------------------------- pieces


def test_stop_signals_set_a_flag_once_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal during the save changes nothing
        assert stop.agreed() and stop.name() == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before


def test_rank_counts_that_keep_the_global_batch():
    assert world_sizes(1024, 32) == [1, 2, 4, 8, 16, 32]
    assert world_sizes(24, 2) == [1, 2, 3, 4, 6, 12]
    with pytest.raises(TrainingError, match="rank counts that keep it: 1, 2, 4, 8, 16, 32$"):
        check_run_config(RunConfig(batch_size=1024, micro_batch_size=32), OptimConfig(), world_size=3)


def test_new_ranks_get_distinct_seeds_fixed_by_seed_step_and_rank():
    seeds = {rank_seed(0, 100, r) for r in range(8)} | {rank_seed(0, 101, 0), rank_seed(1, 100, 0)}
    assert len(seeds) == 10 and rank_seed(0, 100, 3) == rank_seed(0, 100, 3)


def test_a_preempted_run_exits_with_its_own_code_and_one_line(capsys):
    def run(argv):
        raise Preempted("SIGTERM", 7, "out/checkpoints/step_00000007")

    assert cli.main(run, []) == PREEMPTED_EXIT == 75
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("stopped: stopped by SIGTERM at step 7") and "--resume auto" in err


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_optimizer_state_through_the_universal_checkpoint_is_exact(single_rank, reference_run, reference_images,
                                                                   tmp_path, monkeypatch, zero):
    """A checkpoint taken as written by another number of ranks goes through DeepSpeed's universal form; on the
    same single rank the run then ends with the uninterrupted (reference) run's weights, bit for bit: master
    weights, Adam moments and step counts, the schedule and the data position all came through."""
    ref, out = reference_run(zero), str(tmp_path / "run")
    step2 = os.path.join("checkpoints", "step_00000002")
    copy_checkpoint(ref, 2, out)
    monkeypatch.setattr(elastic, "saved_world", lambda path: 2)
    argv = reference_argv(reference_images, out, f"run.zero_stage={zero}", "--resume", "auto")
    assert run_script("train_tokenizer.py", argv) == 0
    assert os.path.isdir(os.path.join(out, step2, "universal", "generator"))
    assert os.path.isdir(os.path.join(out, step2, "universal", "discriminator"))
    names = ["model/model.safetensors"] + (["ema.safetensors"] if zero != 3 else [])
    for name in names:
        a = load_file(os.path.join(ref, "checkpoints", "step_00000004", name))
        b = load_file(os.path.join(out, "checkpoints", "step_00000004", name))
        assert same(a, b), name


# ----------------------------------------------------------------------------- 2 -> 1 -> 2 ranks, every ZeRO stage


# (kind, ZeRO stage, precision, extra overrides): both precisions and LoRA among them
CASES = [("tokenizer1", z, p, []) for z, p in ((0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16"))]
CASES += [("tokenizer2", z, p, []) for z, p in ((0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32"))]
CASES += [("mllm", 0, "bf16", []), ("mllm", 1, "fp32", ["model.lora.enabled=true", "model.lora.r=4"]),
          ("mllm", 2, "bf16", ["model.image_positions=true"]), ("mllm", 3, "fp32", [])]
WORLDS = (2, 1, 2)  # ranks of the three launches; each of the first two stops after 2 of the 6 steps
STEPS = 6


def case_run(case, assets: dict, root: str, phase: int) -> dict:
    kind, zero, precision, extra = case
    out = os.path.join(root, f"{kind}_zero{zero}")
    common = [f"run.output_dir={out}", f"run.steps={STEPS}", "run.save_every=100", "run.keep_last=5",
              f"run.zero_stage={zero}", f"run.precision={precision}", "run.log_every=2", *extra]
    if kind == "mllm":
        config = "configs/mllm/tiny.yaml"
        common += [f"model.llm={assets['llm']}", f"model.vqrae={assets['vqrae']}",
                   f"data.generation.source={assets['data']}", f"data.understanding.source={assets['data']}"]
    else:
        stage = int(kind[-1])
        config = TOKENIZER[stage]
        common += [f"data.source={assets['images']}", *FAST] + ([f"init_from={assets['stage1']}"] if stage == 2 else [])
    return {"kind": "mllm" if kind == "mllm" else "tokenizer", "config": config, "overrides": common,
            "resume": "auto" if phase else None, "stop_after": 2 if phase < 2 else None,
            "record": os.path.join(root, f"{kind}_zero{zero}_phase{phase}"), "out": out}


@pytest.fixture(scope="module")
def world_changes(assets, tmp_path_factory):
    """The three launches; returns (root, their logs, the ZeRO-3 runs). The first (2 ranks) also trains the ZeRO-3
    runs and the signal test's uninterrupted run: a launch is seconds of imports and set-up before its first step."""
    root = str(tmp_path_factory.mktemp("worlds"))
    logs, zero3 = [], zero3_runs(assets, root)
    for phase, ranks in enumerate(WORLDS):
        runs = [case_run(c, assets, root, phase) for c in CASES]
        if phase == 0:
            runs += zero3 + [uninterrupted_run(assets, root)]
        logs.append(launch_runs(runs, ranks, os.path.join(root, f"plan{phase}.json")))
    return root, logs, zero3


def records(root: str, case, phase: int) -> list[dict]:
    kind, zero = case[0], case[1]
    out = []
    for rank in range(WORLDS[phase]):
        with open(os.path.join(root, f"{kind}_zero{zero}_phase{phase}_rank{rank}.json")) as f:
            out.append(json.load(f))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-zero{c[1]}-{c[2]}" for c in CASES])
def test_resume_on_another_number_of_ranks_continues_to_the_end(world_changes, assets, case):
    root, logs, _ = world_changes
    kind, zero = case[0], case[1]
    out = os.path.join(root, f"{kind}_zero{zero}")
    outcomes = [[r["outcome"] for r in records(root, case, p)] for p in range(3)]
    assert outcomes == [["preempted at 2"] * 2, ["preempted at 4"], ["done"] * 2], outcomes
    ckpt = os.path.join(out, "checkpoints")
    assert all(f"zero {zero}, {case[2]}" in log for log in logs)
    assert f"resumed from step 2 on 1 ranks (checkpoint written by 2): {ckpt}/step_00000002" in logs[1]
    assert f"resumed from step 4 on 2 ranks (checkpoint written by 1): {ckpt}/step_00000004" in logs[2]

    # the data continue exactly: every rank's rows over the three launches, none twice, none skipped
    if kind == "mllm":
        for task in ("generation", "understanding"):
            rows = [i for p in range(3) for r in records(root, case, p) for i in r["rows"][task]]
            assert rows and len(rows) == len(set(rows)), (task, rows)
            order = torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist()  # data.seed 0
            assert set(rows) == set(order[: len(rows)]), task
    else:
        rows = [i for p in range(3) for r in records(root, case, p) for batch in r["rows"] for i in batch]
        assert sorted(rows) == list(range(48))  # 6 steps of 8: exactly one epoch

    # the export loads and runs
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    if kind == "mllm":
        from mllm import UnifiedModel

        model = UnifiedModel.from_pretrained(os.path.join(out, "model"))
        assert model.tokenize_images(images).shape == (2, 16)
    else:
        from vqrae import VQRAE

        model = VQRAE.from_pretrained(os.path.join(out, "model"))
        assert model.tokenize(images).shape == (2, 16)
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # bf16 runs too: fp32 master weights
        start = load_file(os.path.join(assets["stage1"] if kind == "tokenizer2" else
                                       os.path.join(ckpt, "step_00000002", "model"), "model.safetensors"))
        end = load_file(os.path.join(out, "model", "model.safetensors"))
        assert any(not torch.equal(start[k], end[k]) for k in start)  # the steps after the changes trained


# ----------------------------------------------------------------------------- real signals


def ranks_of(launcher: subprocess.Popen, count: int, timeout: float = 120) -> list[psutil.Process]:
    proc = psutil.Process(launcher.pid)
    for _ in range(int(timeout * 10)):
        try:  # the runner starts DeepSpeed's launch module, which starts the ranks
            ranks = [c for c in proc.children(recursive=True) if any(a.startswith("--local_rank") for a in c.cmdline())]
        except psutil.NoSuchProcess:
            continue
        if len(ranks) == count:
            return ranks
        threading.Event().wait(0.1)
    raise AssertionError("the launcher never started its ranks")


SIGNAL_STEPS = 20  # the stop lands at step 4 or 5: the signal goes out when step 3 is logged


def signal_overrides(assets: dict) -> list[str]:
    """The signalled run's settings: k-means codebook and the quantizer's own lr, 20 steps of 2 micro-batches."""
    return [f"data.source={assets['images']}", *FAST, f"run.steps={SIGNAL_STEPS}", "run.save_every=1000",
            "run.log_every=1", "run.batch_size=8", "run.micro_batch_size=4", "model.quantizer.init=kmeans",
            "quantizer_lr=5e-4"]


def uninterrupted_run(assets: dict, root: str) -> dict:
    """The signalled run's settings, trained through without a stop (``train`` on 2 ranks, as the script calls it)."""
    out = os.path.join(root, "uninterrupted")
    return {"kind": "tokenizer", "config": TOKENIZER[1], "overrides": [*signal_overrides(assets), f"run.output_dir={out}"],
            "record": out, "out": out}


@pytest.mark.slow
def test_signalled_run_checkpoints_and_resumes_to_the_uninterrupted_result(world_changes, assets, tmp_path):
    """SIGUSR1 (as ``sbatch --signal``) to both ranks, then SIGTERM while they save: both finish the step, write one
    complete checkpoint and exit with 75; ``--resume auto`` ends bit-identical to an uninterrupted run (trained in
    the rank-change tests' first launch), with the k-means codebook (computed before the first step, not again on
    resume) and the quantizer's own lr."""
    steps = SIGNAL_STEPS
    argv = ["scripts/train_tokenizer.py", "--config", TOKENIZER[1], *signal_overrides(assets)]
    ref, out = os.path.join(world_changes[0], "uninterrupted"), str(tmp_path / "run")
    assert run_outcomes(uninterrupted_run(assets, world_changes[0]), 2) == ["done"] * 2
    launcher = subprocess.Popen(deepspeed_cmd(2, *argv, f"run.output_dir={out}"), cwd=ROOT, env=launcher_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks = ranks_of(launcher, 2)
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if re.search(r"\bstep 3 loss/", line):
            for r in ranks:
                r.send_signal(signal.SIGUSR1)
            for r in ranks:
                r.send_signal(signal.SIGTERM)
            break
    lines += launcher.stdout.readlines()
    assert launcher.wait(timeout=300) == PREEMPTED_EXIT, "".join(lines)[-3000:]
    log = "".join(lines)
    assert "lr/quantizer=" in log
    stopped = re.search(r"stopping: SIGUSR1 at step (\d+); checkpoint (\S+)", log)
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < steps and stopped.group(2).endswith(f"step_{step:08d}")
    assert os.path.isfile(os.path.join(stopped.group(2), "manifest.json"))
    assert not os.path.exists(os.path.join(out, "run.lock"))  # released on the way out

    resumed = subprocess.run(deepspeed_cmd(2, *argv, f"run.output_dir={out}", "--resume", "auto"), cwd=ROOT,
                             env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {step} on 2 ranks (checkpoint written by 2)" in resumed.stdout + resumed.stderr
    for name in ("model/model.safetensors", "ema.safetensors"):
        a = load_file(os.path.join(ref, "checkpoints", f"step_{steps:08d}", name))
        b = load_file(os.path.join(out, "checkpoints", f"step_{steps:08d}", name))
        assert same(a, b), f"{name} differs from the uninterrupted run (stopped at step {step})"


# ----------------------------------------------------------------------------- a large LLM under ZeRO-3


def zero3_runs(assets: dict, root: str) -> list[dict]:
    """Unified-model runs under ZeRO-3 on 2 ranks, the LLM partitioned as it is built or built whole: a fresh model
    (its vocabulary grown, or already padded for the new tokens, written here), one continued from an export, LoRA."""
    from tests.helpers import make_llm, make_tokenizer

    tmp = os.path.join(root, "zero3")
    padded = os.path.join(tmp, "padded_llm")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(padded)
    make_llm("llama", len(tokenizer) + 64 + 2 + 8).save_pretrained(padded)  # room for 64 codes, <boi>, <eoi>
    data = [f"data.generation.source={assets['data']}", f"data.understanding.source={assets['data']}"]
    runs = []
    for name, llm, whole in (("fresh", assets["llm"], False), ("fresh_whole", assets["llm"], True),
                             ("padded", padded, False), ("padded_whole", padded, True)):
        out = os.path.join(tmp, name)
        runs.append({"kind": "mllm", "config": "configs/mllm/tiny.yaml", "whole_llm": whole, "record": out, "out": out,
                     "overrides": [f"run.output_dir={out}", "run.steps=4", "run.zero_stage=3", "run.precision=bf16",
                                   "run.save_every=100", f"model.llm={llm}", f"model.vqrae={assets['vqrae']}",
                                   "model.image_positions=true", *data]})
    for name, lora, whole in (("continued", False, False), ("lora", True, False), ("lora_whole", True, True)):
        out = os.path.join(tmp, name)
        runs.append({"kind": "mllm", "config": "configs/mllm/tiny.yaml", "record": out, "out": out, "whole_llm": whole,
                     "overrides": [f"run.output_dir={out}", "run.steps=2", "run.zero_stage=3", "run.save_every=100",
                                   f"init_from={runs[0]['out']}/model", f"model.lora.enabled={str(lora).lower()}",
                                   "model.lora.r=4", *data]})
    return runs


@pytest.mark.slow
def test_zero3_builds_the_llm_partitioned_and_trains_as_when_built_whole(world_changes, assets):
    """On 2 ranks each holds about half of the parameter elements when the engine gets the model, and training
    and the export equal those of the LLM built whole on every rank: a fresh model (its vocabulary grown, or
    already padded for the new tokens, whose rows are then written through the gathered partitions) and one
    continued from an export (``init_from``, as the LLaVA fine-tuning stage does). LoRA builds whole and trains.
    The runs are in the rank-change tests' first launch."""
    runs = world_changes[2]

    def record(run: dict, rank: int) -> dict:
        with open(f"{run['record']}_rank{rank}.json") as f:
            return json.load(f)

    for run in runs:
        for rank in range(2):
            rec = record(run, rank)
            assert rec["outcome"] == "done", (run["out"], rec["outcome"])
            held, total = rec["elements"]
            if run.get("whole_llm") or "lora" in run["out"]:  # LoRA builds whole: peft copies whole embedding rows
                assert held == total
            else:  # the LLM halved; the projector and position table (a few thousand elements) are whole
                llm_elements = sum(t.numel() for t in load_file(os.path.join(run["out"], "model", "llm", "model.safetensors")).values())
                assert held <= total - llm_elements / 2 + 64, (run["out"], held, total)
    for name in ("llm/model.safetensors", "projector.safetensors", "image_positions.safetensors",
                 "adapter/adapter_model.safetensors"):
        for a, b in ((runs[0], runs[1]), (runs[2], runs[3]), (runs[5], runs[6])):
            if os.path.exists(os.path.join(a["out"], "model", name)):
                wa = load_file(os.path.join(a["out"], "model", name))
                wb = load_file(os.path.join(b["out"], "model", name))
                assert same(wa, wb), (a["out"], name)
    assert os.path.exists(os.path.join(runs[5]["out"], "model", "adapter", "adapter_model.safetensors"))
    from mllm import UnifiedModel

    model = UnifiedModel.from_pretrained(os.path.join(runs[4]["out"], "model"))
    assert model.tokenize_images(torch.rand(1, 3, 32, 32) * 2 - 1).shape == (1, 16)
