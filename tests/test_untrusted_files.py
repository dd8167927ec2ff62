"""Files that run code when loaded (pickles, model code named by an ``auto_map``) are refused on every load path
unless the caller opts in; each refusal is one line, and the harmless payloads below never get to run."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from mllm import LoraSettings, MLLMConfig, UnifiedModel
from vqrae import VQRAE
from vqrae.config import ConfigError
from demo.shapes import write_imagefolder
from tests.helpers import plain_env
from tests.helpers import run_script, write_llm, write_vqrae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELING = """import pathlib
pathlib.Path({marker!r}).write_text("model code ran")
from transformers import LlamaForCausalLM


class XForCausalLM(LlamaForCausalLM):
    pass
"""


class Payload:
    """Unpickling calls ``open(marker, "w")``: the marker file exists if and only if the pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickle(path: str, marker: str) -> None:
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)


def plant_code(llm_dir: str, marker: str) -> None:
    with open(os.path.join(llm_dir, "modeling_x.py"), "w") as f:
        f.write(MODELING.format(marker=marker))
    file = os.path.join(llm_dir, "config.json")
    with open(file) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    with open(file, "w") as f:
        json.dump(config, f)


def edit_yaml(path: str, change) -> None:
    with open(path) as f:
        data = yaml.safe_load(f)
    change(data)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny unified model and its parts, each also in a copy that carries a payload writing ``marker``."""
    root = tmp_path_factory.mktemp("untrusted")
    marker = str(root / "MARKER")
    p = {"marker": marker, "llm": write_llm(str(root / "llm"), "llama"), "vqrae": write_vqrae(str(root / "vqrae"))}
    torch.manual_seed(0)
    UnifiedModel.build(MLLMConfig(llm=p["llm"], vqrae=p["vqrae"], dtype="float32")).save_pretrained(str(root / "model"))
    p["model"] = str(root / "model")

    def copy(src: str, name: str) -> str:
        shutil.copytree(src, root / name)
        p[name] = str(root / name)
        return p[name]

    llm = copy(p["llm"], "llm_pickled")
    os.remove(os.path.join(llm, "model.safetensors"))
    plant_pickle(os.path.join(llm, "pytorch_model.bin"), marker)
    plant_code(copy(p["llm"], "llm_code"), marker)

    model = copy(p["model"], "model_pickled")
    os.remove(os.path.join(model, "llm", "model.safetensors"))
    plant_pickle(os.path.join(model, "llm", "pytorch_model.bin"), marker)
    plant_code(os.path.join(copy(p["model"], "model_code"), "llm"), marker)
    edit_yaml(os.path.join(copy(p["model_code"], "model_asks"), "mllm.yaml"),
              lambda d: d.update(trust_remote_code=True))

    vqrae = copy(p["vqrae"], "vqrae_pickled")
    os.remove(os.path.join(vqrae, "model.safetensors"))
    plant_pickle(os.path.join(vqrae, "model.pt"), marker)
    weights = os.path.join(copy(p["vqrae"], "vqrae_truncated"), "model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    edit_yaml(os.path.join(copy(p["vqrae"], "vqrae_asks"), "config.yaml"),
              lambda d: d["encoder"].update(trust_remote_code=True))

    p["weights_pth"] = str(root / "weights.pth")
    plant_pickle(p["weights_pth"], marker)
    p["data"] = str(root / "shapes")
    write_imagefolder(p["data"], 4, 2, seed=0, size=32)
    return p


@pytest.fixture(autouse=True)
def no_marker(files):
    if os.path.exists(files["marker"]):
        os.remove(files["marker"])
    yield
    assert not os.path.exists(files["marker"]), "a payload ran"


def test_the_payloads_do_run_when_loaded_unsafely(files):
    """The checks below would pass vacuously if the payloads were inert."""
    torch.load(files["weights_pth"], weights_only=False)
    assert os.path.exists(files["marker"])
    os.remove(files["marker"])
    model = UnifiedModel.from_pretrained(files["model_asks"], trust_remote_code=True)  # the caller opts in
    assert type(model.llm).__name__ == "XForCausalLM" and model.cfg.trust_remote_code
    assert os.path.exists(files["marker"])
    os.remove(files["marker"])


def _one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_saved_configs_cannot_grant_themselves_trust(files):
    msg = _one_line(UnifiedModel.from_pretrained, files["model_asks"])
    assert "trust_remote_code: true in mllm.yaml" in msg and "--trust-remote-code" in msg
    msg = _one_line(UnifiedModel.from_pretrained, files["model_code"])  # the file says false, the LLM ships code
    assert "auto_map" in msg and "trust_remote_code=True" in msg
    msg = _one_line(VQRAE.from_pretrained, files["vqrae_asks"])
    assert "encoder.trust_remote_code: true" in msg and "trust_remote_code=True" in msg
    assert VQRAE.from_pretrained(files["vqrae_asks"], trust_remote_code=True).cfg.encoder.trust_remote_code
    msg = _one_line(UnifiedModel.build, MLLMConfig(llm=files["llm_code"], vqrae=files["vqrae"], dtype="float32"))
    assert "model.trust_remote_code=true" in msg


def test_saved_encoder_settings_that_read_other_files_are_refused(files, tmp_path):
    path = shutil.copytree(files["vqrae"], tmp_path / "vqrae")
    edit_yaml(str(path / "config.yaml"), lambda d: d["encoder"]["model_kwargs"].update(checkpoint_path=files["weights_pth"]))
    assert "encoder.model_kwargs.checkpoint_path" in _one_line(VQRAE.from_pretrained, str(path))
    path = shutil.copytree(files["vqrae"], tmp_path / "vqrae_hf")
    edit_yaml(str(path / "config.yaml"), lambda d: d["encoder"].update(backend="hf", hf_config={"auto_map": {}}))
    assert "encoder.hf_config.auto_map" in _one_line(VQRAE.from_pretrained, str(path))


def test_pickled_weights_are_refused_naming_the_file(files):
    msg = _one_line(UnifiedModel.from_pretrained, files["model_pickled"])
    assert "pytorch_model.bin" in msg and "use_safetensors=True" in msg
    msg = _one_line(UnifiedModel.build, MLLMConfig(llm=files["llm_pickled"], vqrae=files["vqrae"], dtype="float32"))
    assert "pytorch_model.bin" in msg and "safetensors" in msg
    msg = _one_line(VQRAE.from_pretrained, files["vqrae_pickled"])
    assert "model.pt" in msg and "model.safetensors" in msg
    msg = _one_line(VQRAE.from_pretrained, files["vqrae_truncated"])
    assert "model.safetensors" in msg and "damaged or incomplete" in msg


def test_pickled_lora_adapter_is_refused(files, tmp_path):
    lora = LoraSettings(enabled=True, r=2, alpha=4, dropout=0.0)
    UnifiedModel.build(MLLMConfig(llm=files["llm"], vqrae=files["vqrae"], dtype="float32", lora=lora)).save_pretrained(
        str(tmp_path / "lora"))
    adapter = tmp_path / "lora" / "adapter"
    os.remove(adapter / "adapter_model.safetensors")
    plant_pickle(str(adapter / "adapter_model.bin"), files["marker"])
    assert "adapter_model.bin" in _one_line(UnifiedModel.from_pretrained, str(tmp_path / "lora"))


def test_pickled_lpips_and_inception_weights_are_refused(files):
    from vqrae.losses import PerceptualLoss
    from vqrae.metrics import FIDMetric

    with pytest.raises(ValueError, match=r"weights.pth' is not a .safetensors file"):
        PerceptualLoss("squeeze", files["weights_pth"])
    with pytest.raises(ValueError, match=r"weights.pth' are not a .safetensors file.*--inception-weights"):
        FIDMetric(files["weights_pth"])


# ----------------------------------------------------------------------------- the command lines
# Each case runs the script's ``__main__`` block in this process (``run_script``): its exit code and all it writes
# to stderr are what a user sees, and the marker shows whether a payload ran. The refusals come before any model
# code or weights are loaded, so nothing this process loaded earlier can stand in for what a fresh one would read;
# test_refusals_in_real_interpreters runs one case per script as its own process (warnings and all).


@pytest.fixture
def cli(files, single_rank, monkeypatch, capfd):
    """``cli(script, *args)``: run ``scripts/<script>``; returns the one ``error:`` line, the only line on stderr."""
    import transformers.dynamic_module_utils as dynamic

    from vqrae.runtime.distributed import init_distributed

    modules = os.path.join(os.path.dirname(files["marker"]), "hf_modules")  # model code copied here, if ever
    monkeypatch.setenv("HF_MODULES_CACHE", modules)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", modules)
    # The process group's first start in this process, before the case: DeepSpeed then probes for libaio with the
    # C compiler, whose complaint a real interpreter silences but pytest's capture lets through to stderr.
    init_distributed()

    def run(script: str, *args: str) -> str:
        capfd.readouterr()
        code = run_script(script, list(args))
        err = capfd.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err[-3000:])
        return lines[0]

    return run


def _train_args(files, *overrides: str) -> list[str]:
    data = [f"data.generation.source={files['data']}", f"data.understanding.source={files['data']}",
            f"run.output_dir={os.path.join(os.path.dirname(files['marker']), 'run')}"]
    return ["--config", os.path.join(ROOT, "configs", "mllm", "tiny.yaml"), *data, *overrides]


def _generate_args(files, case: str, out: str) -> list[str]:
    return ["--model", files[case], "--prompt", "a red circle", "--out", out, "--device", "cpu"]


def _eval_args(files, *flags: str) -> list[str]:
    return ["--model", files["vqrae"], "--data", files["data"], "--device", "cpu", *flags]


@pytest.mark.parametrize("case,expected", [
    ("model_pickled", "pytorch_model.bin"), ("model_code", "auto_map"), ("model_asks", "--trust-remote-code")])
def test_generate_refuses(files, cli, tmp_path, case, expected):
    assert expected in cli("generate.py", *_generate_args(files, case, str(tmp_path / "out")))


@pytest.mark.parametrize("overrides,expected", [
    (["init_from={model_pickled}"], "pytorch_model.bin"),
    (["init_from={model_asks}"], "trust_remote_code: true in mllm.yaml"),
    (["model.llm={llm_code}", "model.vqrae={vqrae}"], "model.trust_remote_code=true"),
    (["model.llm={llm_pickled}", "model.vqrae={vqrae}"], "pytorch_model.bin"),
    (["model.llm={llm}", "model.vqrae={vqrae_pickled}"], "model.pt"),
    (["model.llm={llm}", "model.vqrae={vqrae_truncated}"], "damaged or incomplete"),
])
def test_train_mllm_refuses(files, cli, overrides, expected):
    assert expected in cli("train_mllm.py", *_train_args(files, *[o.format(**files) for o in overrides]))


@pytest.mark.parametrize("flags,expected", [
    (["--no-fid", "--lpips-backbone", "{weights_pth}"], "LPIPS backbone"),
    (["--inception-weights", "{weights_pth}", "--lpips-backbone", "random"], "--inception-weights"),
])
def test_eval_tokenizer_refuses(files, cli, flags, expected):
    line = cli("eval_tokenizer.py", *_eval_args(files, *[f.format(**files) for f in flags]))
    assert expected in line and "weights.pth" in line


@pytest.mark.slow  # a Python process per script
def test_refusals_in_real_interpreters(files, tmp_path):
    """A fresh interpreter prints warnings and progress that an in-process run does not: one refusal per script
    is still the only line on stderr, with exit code 2, and its payload never runs."""
    env = plain_env()
    env["HF_MODULES_CACHE"] = os.path.join(os.path.dirname(files["marker"]), "hf_modules")
    runs = {
        "generate.py": (_generate_args(files, "model_code", str(tmp_path / "out")), "auto_map"),
        "train_mllm.py": (_train_args(files, f"init_from={files['model_pickled']}"), "pytorch_model.bin"),
        "eval_tokenizer.py": (_eval_args(files, "--no-fid", "--lpips-backbone", files["weights_pth"]), "LPIPS backbone"),
    }
    procs = {script: subprocess.Popen([sys.executable, os.path.join("scripts", script), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script, (args, _) in runs.items()}  # at once: most of each run is importing, which overlaps well
    for script, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (script, stderr[-3000:])
        assert runs[script][1] in lines[0], (script, lines[0])
