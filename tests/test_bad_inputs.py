"""Bad input to every entry point ends with exit code 2 and one ``error:`` line on stderr, never a traceback.

Each case runs the script's ``__main__`` block in this process (``run_script``), so its exit code and stderr are
what a user sees; two late ones also run in real interpreters. Errors found before any setup leave stderr with exactly
that line; errors found after the trainer started (process group, model, data) may follow its progress output.
scripts/generate.py's own table lives in tests/test_generate_cli.py; the cases here are the ones it lacks.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mllm import MLLMConfig, UnifiedModel, add_image_tokens
from mllm.codes import write_codes
from tests.helpers import make_tokenizer, tiny_vqrae_config, write_llm, write_tiny_assets, write_vqrae
from tests.helpers import plain_env
from tests.helpers import ROOT, error_line, run_script, write_images
from vqrae import VQRAE

TOKENIZER_CONFIG = os.path.join(ROOT, "configs", "tokenizer", "tiny_stage1.yaml")
MLLM_CONFIG = os.path.join(ROOT, "configs", "mllm", "tiny.yaml")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Every file and folder the cases name, good and broken."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    p = {"tmp": str(tmp), "tiny": TOKENIZER_CONFIG, "mllm_tiny": MLLM_CONFIG}

    p["images"] = str(tmp / "images")
    write_images(os.path.join(p["images"], "train"), 8)
    p["few"] = str(tmp / "few")
    write_images(os.path.join(p["few"], "train"), 2)

    yamls = {
        "syntax_yaml": "run: {steps: [1, 2}\n",
        "list_yaml": "- stage: 1\n",
        "loop_a_yaml": "inherit: loop_b.yaml\nstage: 1\n",
        "loop_b_yaml": "inherit: loop_a.yaml\n",
        "unknown_key_yaml": f"inherit: {TOKENIZER_CONFIG}\nrun: {{stepz: 3}}\n",
        "wrong_type_yaml": f"inherit: {TOKENIZER_CONFIG}\nrun: {{steps: lots}}\n",
    }
    for key, text in yamls.items():
        p[key] = str(tmp / (key[: -len("_yaml")] + ".yaml"))
        with open(p[key], "w") as f:
            f.write(text)
    p["bad_json"] = str(tmp / "zero.json")
    with open(p["bad_json"], "w") as f:
        f.write('{"zero_optimization": {"stage": 2,}')

    p["damaged_export"] = write_vqrae(str(tmp / "damaged_export"))
    with open(os.path.join(p["damaged_export"], "model.safetensors"), "wb") as f:
        f.write(b"\0" * 16)
    p["not_checkpoint"] = str(tmp / "not_checkpoint")
    os.makedirs(os.path.join(p["not_checkpoint"], "generator"))
    p["torn_checkpoint"] = str(tmp / "torn_checkpoint")
    os.makedirs(p["torn_checkpoint"])
    with open(os.path.join(p["torn_checkpoint"], "manifest.json"), "w") as f:
        f.write('{"step": 4, "files": ["trainer.pt", "generator/mp_rank_00_model_states.pt"]}')

    # the unified model's assets, an export, and copies that disagree with their VQRAE or are damaged
    assets = write_tiny_assets(str(tmp / "mllm"), num_train=8)
    p.update(llm=assets["llm"], vqrae=assets["vqrae"], shapes=assets["data"])
    torch.manual_seed(0)
    p["model"] = str(tmp / "model")
    UnifiedModel.build(MLLMConfig(llm=p["llm"], vqrae=p["vqrae"], dtype="float32")).save_pretrained(p["model"])

    def variant(name: str, change) -> None:
        p[name] = str(tmp / name)
        shutil.copytree(p["model"], p[name])
        change(p[name])

    def small_codebook_tokenizer(path: str) -> None:
        shutil.rmtree(os.path.join(path, "tokenizer"))
        tok = make_tokenizer()
        add_image_tokens(tok, 32)
        tok.save_pretrained(os.path.join(path, "tokenizer"))

    def overwrite(name: str, data: str | bytes, append: bool = False):
        def change(path: str) -> None:
            mode = ("a" if append else "w") + ("b" if isinstance(data, bytes) else "")
            with open(os.path.join(path, name), mode) as f:
                f.write(data)
        return change

    variant("codebook_mismatch", small_codebook_tokenizer)
    variant("bad_yaml_model", overwrite("mllm.yaml", "llm: [unclosed\n"))
    variant("bad_projector_model", overwrite("projector.safetensors", b"\0" * 16))
    variant("unknown_key_model", overwrite("mllm.yaml", "bogus_key: 1\n", append=True))
    tok = make_tokenizer()
    add_image_tokens(tok, 32)
    p["llm_32_codes"] = write_llm(str(tmp / "llm_32_codes"), "qwen3", tok)
    torch.manual_seed(1)
    p["other_codes"] = str(tmp / "other_codes")
    write_codes(VQRAE(tiny_vqrae_config(codebook_size=32)), p["shapes"], p["other_codes"], workers=1)

    p["image"] = str(tmp / "q.png")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(p["image"])
    p["zero_png"] = str(tmp / "zero.png")
    open(p["zero_png"], "wb").close()
    p["prompts"] = str(tmp / "prompts.txt")
    with open(p["prompts"], "w") as f:
        f.write("a red circle\n")
    p["latin1"] = str(tmp / "latin1.txt")
    with open(p["latin1"], "wb") as f:
        f.write("un cercle rouge à gauche\n".encode("latin-1"))
    p["a_file"] = p["prompts"]
    return p


def tok(*extra: str) -> list[str]:
    return ["--config", "{tiny}", "data.source={images}", "run.output_dir={tmp}/tok_run", "run.tensorboard=false",
            "loss.perceptual_weight=0", *extra]


def tok_config(config: str, *extra: str) -> list[str]:
    return ["--config", config, "data.source={images}", "run.output_dir={tmp}/tok_run", *extra]


def mllm(*extra: str) -> list[str]:
    return ["--config", "{mllm_tiny}", "model.llm={llm}", "model.vqrae={vqrae}", "data.generation.source={shapes}",
            "data.understanding.source={shapes}", "run.output_dir={tmp}/mllm_run", "run.tensorboard=false", *extra]


def gen(*extra: str) -> list[str]:
    return ["--model", "{model}", "--out", "{tmp}/generated", *extra]


TOKENIZER, MLLM, GENERATE = "train_tokenizer.py", "train_mllm.py", "generate.py"
LATE = "late"  # raised once the trainer has started: other output may come before the error line

CASES = [
    # -- scripts/train_tokenizer.py: config file and overrides
    (TOKENIZER, "unknown key", tok("foo=1"), r"unknown config key 'foo'.*valid keys here: codebook_window"),
    (TOKENIZER, "unknown nested key", tok("run.stepz=3"), r"unknown config key 'run.stepz'.*batch_size"),
    (TOKENIZER, "wrong type", tok("run.steps=many"), r"bad value for config key 'run.steps'"),
    (TOKENIZER, "unknown key in yaml", tok_config("{unknown_key_yaml}"), r"unknown config key 'run.stepz'"),
    (TOKENIZER, "wrong type in yaml", tok_config("{wrong_type_yaml}"), r"bad value for config key 'run.steps'"),
    (TOKENIZER, "missing config file", tok_config("{tmp}/nowhere.yaml"), r"config file not found: .*nowhere.yaml"),
    (TOKENIZER, "yaml syntax error", tok_config("{syntax_yaml}"), r"cannot parse .*syntax.yaml"),
    (TOKENIZER, "inherit loop", tok_config("{loop_a_yaml}"), r"inherit from each other in a loop: .*loop_a.yaml"),
    (TOKENIZER, "yaml not a mapping", tok_config("{list_yaml}"), r"must hold a mapping"),
    (TOKENIZER, "override without =", tok("run.steps"), r"override 'run.steps' must look like key.sub=value"),
    (TOKENIZER, "unknown flag", tok("--steps", "3"), r"unrecognized arguments: --steps"),
    (TOKENIZER, "unknown loss kind", tok("loss.recon=l3"), r"loss.recon: unknown reconstruction loss 'l3'"),
    # -- data
    (TOKENIZER, "empty data source", tok("data.source=''"), r"data.source is empty"),
    (TOKENIZER, "missing data folder", tok("data.source={tmp}/no_such_dir"), r"is not an existing folder or file", LATE),
    (TOKENIZER, "no shards match", tok("data.source={tmp}/shards/*.tar"), r"no shards match", LATE),
    (TOKENIZER, "fewer images than a batch", tok("data.source={few}"),
     r"2 rows over 1 ranks do not fill one batch of 4", LATE),
    # -- stages and checkpoints
    (TOKENIZER, "stage 2 without stage 1", tok("stage=2"), r"stage 2 needs init_from.*run stage 1 first"),
    (TOKENIZER, "init_from not a checkpoint", tok("stage=2", "init_from={tmp}"),
     r"not a VQRAE export.*run stage 1 first"),
    (TOKENIZER, "init_from damaged weights", tok("stage=2", "init_from={damaged_export}"),
     r"cannot build the VQRAE from init_from .*cannot be read .*the file is damaged or incomplete", LATE),
    (TOKENIZER, "stage 3", tok("stage=3"), r"stage must be 1 or 2, got 3"),
    (TOKENIZER, "negative quantizer lr", tok("quantizer_lr=-1e-4"), r"quantizer_lr must be > 0, got -0.0001"),
    (TOKENIZER, "zero encoder lr", tok("stage=2", "init_from={damaged_export}", "encoder_lr=0"),
     r"encoder_lr must be > 0, got 0.0"),
    (TOKENIZER, "resume not a checkpoint", tok("--resume", "{not_checkpoint}"), r"not a complete checkpoint", LATE),
    (TOKENIZER, "resume torn checkpoint", tok("--resume", "{torn_checkpoint}"),
     r"not a complete checkpoint \(trainer.pt is missing\)", LATE),
    # -- model shapes
    (TOKENIZER, "decoder size is not grid x patch", tok("model.decoder.image_size=48"),
     r"decoder.image_size 48 must equal the token grid 4 x decoder.patch_size 8 = 32", LATE),
    (TOKENIZER, "encoder size is not a patch multiple", tok("model.encoder.image_size=36"),
     r"encoder.image_size 36 is not a multiple of the encoder patch size 8", LATE),
    (TOKENIZER, "unknown quantizer kind", tok("model.quantizer.kind=lfq"), r"quantizer.kind must be one of", LATE),
    (TOKENIZER, "codebook of one code", tok("model.quantizer.codebook_size=1"), r"codebook_size >= 2", LATE),
    (TOKENIZER, "unknown encoder", tok("model.encoder.name=vit_nope"), r"RuntimeError: Unknown model \(vit_nope\)",
     LATE),
    (TOKENIZER, "lpips net", tok("loss.perceptual_weight=0.1", "loss.lpips_net=resnet"), r"unknown LPIPS net 'resnet'",
     LATE),
    (TOKENIZER, "lpips trunk file", tok("loss.perceptual_weight=0.1", "loss.lpips_backbone={tmp}/vgg.pth"),
     r"LPIPS backbone file not found", LATE),
    # -- run and optimizer settings
    (TOKENIZER, "batch not divisible", tok("run.batch_size=6"),
     r"run.batch_size 6 is not divisible by micro_batch_size 4"),
    (TOKENIZER, "zero micro batch", tok("run.micro_batch_size=0"), r"run.micro_batch_size must be >= 1, got 0"),
    (TOKENIZER, "bad precision", tok("run.precision=fp16"), r"run.precision must be 'bf16' or 'fp32', got 'fp16'"),
    (TOKENIZER, "bad zero stage", tok("run.zero_stage=4"), r"run.zero_stage must be 0, 1, 2 or 3, got 4"),
    (TOKENIZER, "save_every 0", tok("run.save_every=0"), r"run.save_every must be >= 1"),
    (TOKENIZER, "ema decay above 1", tok("run.ema_decay=1.5"), r"run.ema_decay must lie in \[0, 1\)"),
    (TOKENIZER, "unknown schedule", tok("optim.schedule=linear"), r"optim.schedule must be 'cosine' or 'constant'"),
    (TOKENIZER, "negative lr", tok("optim.lr=-1"), r"optim.lr must be a positive number"),
    (TOKENIZER, "missing deepspeed json", tok("run.deepspeed_config={tmp}/none.json"),
     r"run.deepspeed_config not found"),
    (TOKENIZER, "invalid deepspeed json", tok("run.deepspeed_config={bad_json}"), r"zero.json is not valid JSON", LATE),
    # -- scripts/train_mllm.py
    (MLLM, "unknown key", mllm("model.lmm=x"), r"unknown config key 'model.lmm'"),
    (MLLM, "wrong type", mllm("data.task_ratio=half"), r"bad value for config key 'data.task_ratio'"),
    (MLLM, "missing config file", ["--config", "{tmp}/nowhere.yaml"], r"config file not found"),
    (MLLM, "yaml syntax error", ["--config", "{syntax_yaml}"], r"cannot parse"),
    (MLLM, "override without =", mllm("data.task_ratio"), r"must look like key.sub=value"),
    (MLLM, "unknown flag", mllm("--steps", "3"), r"unrecognized arguments: --steps"),
    (MLLM, "task ratio above 1", mllm("data.task_ratio=1.5"), r"data.task_ratio must lie in \[0, 1\]"),
    (MLLM, "frozen llm with generation", mllm("model.freeze_llm=true"), r"generation never uses"),
    (MLLM, "no llm", mllm("model.llm=''"), r"model.llm is not set"),
    (MLLM, "missing llm folder", mllm("model.llm={tmp}/no_llm"), r"no_llm", LATE),
    (MLLM, "missing vqrae", mllm("model.vqrae={tmp}/no_vqrae"), r"no VQRAE checkpoint at .*no_vqrae", LATE),
    (MLLM, "init_from not an export", mllm("init_from={tmp}"), r"run the earlier stage first"),
    (MLLM, "codebook mismatch in an export", mllm("init_from={codebook_mismatch}"),
     r"32 image code tokens but the VQRAE codebook has 64", LATE),
    (MLLM, "codebook mismatch between llm and vqrae", mllm("model.llm={llm_32_codes}"), r"\b32\b.*\b64\b", LATE),
    (MLLM, "codes of another vqrae", mllm("data.generation.codes_from={other_codes}"), r"computed by another VQRAE",
     LATE),
    (MLLM, "codes_from without codes", mllm("data.generation.codes_from={tmp}"), r"holds no codes.json"),
    (MLLM, "missing generation data", mllm("data.generation.source={tmp}/no_data"), r"is not an existing folder or file",
     LATE),
    (MLLM, "unknown caption column", mllm("data.generation.caption_column=nope"), r"data.generation: .*'nope'", LATE),
    (MLLM, "batch not divisible", mllm("run.batch_size=3"), r"not divisible by micro_batch_size 2"),
    (MLLM, "bad precision", mllm("run.precision=fp16"), r"run.precision"),
    (MLLM, "bad zero stage", mllm("run.zero_stage=7"), r"run.zero_stage"),
    (MLLM, "ema", mllm("run.ema_decay=0.9"), r"keeps no EMA"),
    (MLLM, "resume not a checkpoint", mllm("--resume", "{not_checkpoint}"), r"not a complete checkpoint", LATE),
    (MLLM, "fewer rows than a batch", mllm("run.micro_batch_size=16", "run.batch_size=16"),
     r"8 rows over 1 ranks do not fill one batch of 16", LATE),
    # -- scripts/generate.py (cases tests/test_generate_cli.py does not have)
    (GENERATE, "zero batch size", gen("--prompt", "a red circle", "--batch-size", "0"), r"--batch-size must be >= 1"),
    (GENERATE, "zero answer tokens", gen("--image", "{image}", "--prompt", "what", "--max-new-tokens", "0"),
     r"--max-new-tokens must be >= 1"),
    (GENERATE, "infinite temperature", gen("--prompt", "a red circle", "--temperature", "inf"), r"finite number"),
    (GENERATE, "nan top-p", gen("--prompt", "a red circle", "--top-p", "nan"), r"--top-p must be a finite number"),
    (GENERATE, "prompt and prompts", gen("--prompt", "a", "--prompts", "{prompts}"), r"not both"),
    (GENERATE, "image without a question", gen("--image", "{image}"), r"--image needs the question"),
    (GENERATE, "image is a folder", gen("--image", "{tmp}", "--prompt", "what"), r"does not exist"),
    (GENERATE, "zero-byte image", gen("--image", "{zero_png}", "--prompt", "what"), r"cannot read image .*: empty"),
    (GENERATE, "prompts not utf-8", gen("--prompts", "{latin1}"), r"cannot read prompts file"),
    (GENERATE, "bad dtype", gen("--prompt", "a", "--dtype", "int8"), r"argument --dtype: invalid choice: 'int8'"),
    (GENERATE, "bad device", gen("--prompt", "a red circle", "--device", "bogus"), r"--device 'bogus'"),
    (GENERATE, "model is a file", ["--model", "{a_file}", "--prompt", "a", "--out", "{tmp}/g"], r"no model directory"),
    (GENERATE, "model folder without config", ["--model", "{images}", "--prompt", "a", "--out", "{tmp}/g"],
     r"no unified model checkpoint"),
    (GENERATE, "damaged model config", ["--model", "{bad_yaml_model}", "--prompt", "a", "--out", "{tmp}/g"],
     r"cannot be loaded: ParserError"),
    (GENERATE, "damaged projector", ["--model", "{bad_projector_model}", "--prompt", "a", "--out", "{tmp}/g"],
     r"projector weights .* cannot be read .*damaged or incomplete"),
    (GENERATE, "unknown key in model config", ["--model", "{unknown_key_model}", "--prompt", "a", "--out", "{tmp}/g"],
     r"unknown config key 'bogus_key'"),
]


def _param(script, name, argv, expect, *flags):
    marks = [f for f in flags if not isinstance(f, str)]
    return pytest.param(script, argv, expect, LATE in flags, marks=marks, id=f"{script[:-3]}: {name}")


@pytest.mark.parametrize("script, argv, expect, late", [_param(*c) for c in CASES])
def test_bad_input_exits_2_with_one_line(single_rank, paths, capfd, script, argv, expect, late):
    capfd.readouterr()
    code = run_script(script, [a.format(**paths) for a in argv])
    out = capfd.readouterr()
    assert code == 2, out.err[-3000:]
    line = error_line(out.err)
    assert re.search(expect, line), line
    assert "Traceback" not in out.out
    if not late:
        assert out.err == line + "\n"  # nothing else: the check ran before any setup


def test_late_errors_in_real_interpreters(paths):
    """A fresh interpreter prints warnings and progress bars that an in-process run does not: errors found after
    setup began still end stderr with the one line, without a traceback. (Early errors in real interpreters:
    tests/test_train_tokenizer.py, tests/test_train_mllm.py, tests/test_generate_cli.py.)"""
    env = plain_env()
    runs = {
        "tokenizer model": (TOKENIZER, tok("model.decoder.image_size=48"), r"must equal the token grid"),
        "generate model": (GENERATE, ["--model", "{bad_projector_model}", "--prompt", "a", "--out", "{tmp}/g"],
                           r"projector weights .* cannot be read .*damaged or incomplete"),
    }
    procs = {
        name: subprocess.Popen([sys.executable, os.path.join("scripts", script), *[a.format(**paths) for a in argv]],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (script, argv, _) in runs.items()
    }  # at once: most of each run is importing, which overlaps well
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, proc.returncode, stdout[-2000:], stderr[-3000:])
        assert re.search(runs[name][2], error_line(stderr)), (name, stderr)
        assert "Traceback" not in stdout
