"""An LLM given as a GGUF file (``model.gguf_file``) builds, trains, checkpoints, resumes and exports as a plain
safetensors model that rebuilds without the file; a GGUF named the wrong way is a one-line hint."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mllm import MLLMConfig, UnifiedModel
from mllm.train import MLLMTrainConfig, train
from tests.helpers import CHATML, CODEBOOK_SIZE, ROOT, error_line, log_lines, make_llm, plain_env, run_script, write_vqrae
from vqrae.config import load_config
from demo.shapes import write_imagefolder

gguf = pytest.importorskip("gguf")

CONFIG = "configs/mllm/tiny.yaml"
GGUF_NAME = "tiny.gguf"


def write_gguf(path: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random LLaMA as a float32 GGUF file with a byte-level BPE tokenizer; returns the source model."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = ["Ġa", "Ġt", "Ġth", "Ġthe", "Ġr", "Ġre", "Ġred"]  # every merge result is itself a token
    merges = ["Ġ a", "Ġ t", "Ġt h", "Ġth e", "Ġ r", "Ġr e", "Ġre d"]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = alphabet + pieces + special
    model = make_llm("llama", len(tokens), seed)
    c = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(alphabet) + len(pieces)) + [3] * len(special))  # 3: control tokens
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    llm = root / "gguf_llm"
    llm.mkdir()
    write_gguf(str(llm / GGUF_NAME))
    paths = {"llm": str(llm), "vqrae": write_vqrae(str(root / "vqrae")), "data": str(root / "shapes")}
    write_imagefolder(paths["data"], 16, 4, seed=0, size=32)
    return paths


def _cfg(assets, **kw) -> MLLMConfig:
    return MLLMConfig(**{"llm": assets["llm"], "gguf_file": GGUF_NAME, "vqrae": assets["vqrae"], "dtype": "float32",
                         **kw})


def test_gguf_model_saves_as_plain_safetensors_and_reloads_without_the_file(assets, tmp_path):
    torch.manual_seed(0)
    model = UnifiedModel.build(_cfg(assets))
    assert getattr(model.llm, "hf_quantizer", None) is None and not getattr(model.llm, "is_quantized", False)
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in model.llm.parameters())
    model.save_pretrained(str(tmp_path / "ckpt"))  # raised "quantized with gguf and is not serializable"
    with open(tmp_path / "ckpt" / "mllm.yaml") as f:
        assert yaml.safe_load(f)["gguf_file"] is None
    with open(tmp_path / "ckpt" / "llm" / "config.json") as f:
        assert "quantization_config" not in f.read()
    moved = str(tmp_path / "moved_gguf")  # the GGUF folder is gone: the checkpoint must not need it
    shutil.move(assets["llm"], moved)
    try:
        loaded = UnifiedModel.from_pretrained(str(tmp_path / "ckpt"))
    finally:
        shutil.move(moved, assets["llm"])
    ids = torch.tensor([model.tokenizer(" a red the").input_ids + list(model.vocab.code_ids)[:3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    assert loaded.cfg.gguf_file is None


def test_gguf_named_as_model_llm_is_a_one_line_hint(assets):
    from vqrae.config import ConfigError

    file = os.path.join(assets["llm"], GGUF_NAME)
    with pytest.raises(ConfigError) as err:
        UnifiedModel.build(_cfg(assets, llm=file, gguf_file=None))
    msg = str(err.value)
    assert "\n" not in msg and f"model.llm={assets['llm']} model.gguf_file={GGUF_NAME}" in msg


def test_gguf_folder_without_gguf_file_names_the_files(assets, tmp_path):
    from vqrae.config import ConfigError

    shutil.copy(os.path.join(assets["llm"], GGUF_NAME), tmp_path / "other.gguf")
    shutil.copy(os.path.join(assets["llm"], GGUF_NAME), tmp_path / GGUF_NAME)
    with pytest.raises(ConfigError) as err:
        UnifiedModel.build(_cfg(assets, llm=str(tmp_path), gguf_file=None))
    msg = str(err.value)
    assert "\n" not in msg and "model.gguf_file" in msg and f"other.gguf, {GGUF_NAME}" in msg
    with pytest.raises(ConfigError, match=r"model.gguf_file 'nope.gguf' is not in .*other.gguf"):
        UnifiedModel.build(_cfg(assets, llm=str(tmp_path), gguf_file="nope.gguf"))


@pytest.mark.slow  # a Python process of its own
def test_training_cli_hints(assets, single_rank, monkeypatch, capfd):
    """A GGUF file named as the LLM, or a folder holding one with no ``gguf_file``: the error line says which
    overrides to use. The first in a fresh interpreter, where stderr holds that line alone (no warnings or
    progress output before it); the second in this process, which checks the line itself."""
    common = [f"model.vqrae={assets['vqrae']}", f"data.generation.source={assets['data']}",
              f"data.understanding.source={assets['data']}", "run.output_dir=/nonexistent/never_written"]
    proc = subprocess.run([sys.executable, "scripts/train_mllm.py", "--config", CONFIG,
                           f"model.llm={os.path.join(assets['llm'], GGUF_NAME)}", *common], cwd=ROOT,
                          env=plain_env(), capture_output=True,
                          text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert f"model.llm={assets['llm']} model.gguf_file={GGUF_NAME}" in lines[0]

    monkeypatch.chdir(ROOT)
    capfd.readouterr()
    assert run_script("train_mllm.py", ["--config", CONFIG, f"model.llm={assets['llm']}", *common]) == 2
    line = error_line(capfd.readouterr().err)
    assert "model.gguf_file" in line and GGUF_NAME in line


@pytest.mark.slow
def test_gguf_llm_trains_checkpoints_resumes_and_exports(single_rank, assets, tmp_path, caplog):
    out = str(tmp_path / "run")
    common = [f"model.llm={assets['llm']}", f"model.gguf_file={GGUF_NAME}", f"model.vqrae={assets['vqrae']}",
              f"data.generation.source={assets['data']}", f"data.understanding.source={assets['data']}",
              "run.batch_size=2", "run.micro_batch_size=2", "run.save_every=1", "run.log_every=1",
              "run.keep_last=5", f"run.output_dir={out}"]
    caplog.set_level("INFO", logger="vqrae")
    train(load_config(MLLMTrainConfig, os.path.join(ROOT, CONFIG), [*common, "run.steps=2"]))
    step2 = os.path.join(out, "checkpoints", "step_00000002", "model")
    for step in (os.path.join(out, "checkpoints", "step_00000001", "model"), step2):
        with open(os.path.join(step, "mllm.yaml")) as f:
            assert yaml.safe_load(f)["gguf_file"] is None
    # The first steps run at warmup lr 0; the resumed third step is the one that moves the weights.
    train(load_config(MLLMTrainConfig, os.path.join(ROOT, CONFIG), [*common, "run.steps=3"]), "auto")
    assert any("resumed from" in line for line in log_lines(caplog))
    export = os.path.join(out, "model")
    model = UnifiedModel.from_pretrained(export)
    assert model.cfg.gguf_file is None and len(model.tokenizer) == 266 + CODEBOOK_SIZE + 3
    before = load_file(os.path.join(step2, "llm", "model.safetensors"))
    final = load_file(os.path.join(export, "llm", "model.safetensors"))
    assert before.keys() == final.keys()
    assert any(not torch.equal(before[k], final[k]) for k in before)  # the resumed step trained the LLM
