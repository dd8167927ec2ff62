"""Generation streams its PNGs to disk; unusable data sources and missing weights end a run with one line.

The data cases run the real entry points (exit code 2, one ``error:`` line ending stderr, no traceback): in this
process, except where a fresh interpreter is the point: the hub made unreachable with HF_HUB_OFFLINE (read when the
hub libraries load), so a hub id fails at once instead of after retries, and a missing LPIPS download.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm import MLLMConfig, UnifiedModel
from mllm.inference import load_model, to_uint8
from tests.helpers import error_line, plain_env, run_script, write_tiny_assets

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_CONFIG = str(ROOT / "configs" / "tokenizer" / "tiny_stage1.yaml")
MLLM_CONFIG = str(ROOT / "configs" / "mllm" / "tiny.yaml")


def _latin1_metadata(folder: Path) -> None:
    """Rewrite ``folder/metadata.jsonl`` in Latin-1, with a non-ASCII caption so it is no longer UTF-8."""
    path = folder / "metadata.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace('"caption": "', '"caption": "caf\u00e9 ', 1)
    assert "caf\u00e9" in lines[1]
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("io")
    paths = write_tiny_assets(str(root / "tiny"), num_train=8)
    torch.manual_seed(0)
    paths["model"] = str(root / "model")
    cfg = MLLMConfig(llm=paths["llm"], vqrae=paths["vqrae"], dtype="float32")
    UnifiedModel.build(cfg).save_pretrained(paths["model"])
    paths["latin1"] = str(root / "latin1")
    shutil.copytree(paths["data"], paths["latin1"])
    _latin1_metadata(Path(paths["latin1"]) / "train")
    _latin1_metadata(Path(paths["latin1"]) / "test")
    paths["tmp"] = str(root)
    return paths


def _start(script: str, *argv: str, torch_home: str | None = None) -> subprocess.Popen:
    env = plain_env()  # a plain single-process run
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if torch_home:
        env["TORCH_HOME"] = torch_home  # an empty hub cache: no LPIPS weights to find
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _run(script: str, *argv: str, torch_home: str | None = None) -> subprocess.CompletedProcess:
    return _finish(_start(script, *argv, torch_home=torch_home))


def _run_here(script: str, argv: list[str], capfd) -> subprocess.CompletedProcess:
    """``scripts/<script> argv`` in this process (``run_script``), as ``_run`` reports a fresh interpreter's run."""
    capfd.readouterr()
    code = run_script(script, argv)
    out = capfd.readouterr()
    return subprocess.CompletedProcess(script, code, out.out, out.err)


def _assert_one_line(proc: subprocess.CompletedProcess, pattern: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    line = error_line(proc.stderr)
    assert re.search(pattern, line), line
    assert "Traceback" not in proc.stdout
    return line


# ----------------------------------------------------------------------------- data sources

SOURCES = {  # data.source -> what the error line says
    "not utf-8": ("{latin1}", r"metadata file '.*latin1/train/metadata\.jsonl' is not UTF-8 \(line 2\): "
                              r"it must be UTF-8 JSON lines$"),
    "mistyped relative path": ("./data/shapse", r"'\./data/shapse' is not an existing folder or file"),
    "mistyped absolute path": ("/data/x", r"'/data/x' is not an existing folder or file"),
    "typo under an existing folder": ("configs/shapse", r"'configs/shapse' is not an existing folder or file"),
    "hub id offline": ("owner/name", r"hub dataset 'owner/name' cannot be loaded: the hub could not be reached or "
                                     r"the id was not found"),
}


TRAINING = [("train_tokenizer.py", "not utf-8"), ("train_tokenizer.py", "mistyped relative path"),
            ("train_mllm.py", "not utf-8")]  # a few, in this process; "hub id offline": a fresh interpreter


@pytest.mark.parametrize("case", [c for c in SOURCES if c != "hub id offline"])  # offline only in a fresh process
def test_open_source_error_is_one_line(assets, monkeypatch, case):
    from vqrae.data import DataConfig, open_source

    monkeypatch.chdir(ROOT)  # where the relative cases are meant
    source, pattern = SOURCES[case]
    with pytest.raises(ValueError) as err:
        open_source(DataConfig(source=source.format(**assets)), cache_dir=os.path.join(assets["tmp"], "cache"))
    assert re.search(pattern, str(err.value)) and "\n" not in str(err.value), str(err.value)


def _training_argv(script: str, case: str, assets: dict) -> list[str]:
    source = SOURCES[case][0].format(**assets)
    out = os.path.join(assets["tmp"], "runs", f"{script[:-3]}-{case.replace(' ', '-')}")
    if script == "train_tokenizer.py":
        argv = ["--config", TOKENIZER_CONFIG, f"data.source={source}", "loss.perceptual_weight=0"]
    else:
        argv = ["--config", MLLM_CONFIG, f"model.llm={assets['llm']}", f"model.vqrae={assets['vqrae']}",
                f"data.generation.source={source}", f"data.understanding.source={source}"]
    return [*argv, f"run.output_dir={out}", "run.tensorboard=false"]


@pytest.mark.slow
@pytest.mark.parametrize("script, case", TRAINING, ids=[f"{s[:-3]}: {c}" for s, c in TRAINING])
def test_training_data_source_fails_in_one_line(single_rank, assets, monkeypatch, capfd, script, case):
    monkeypatch.chdir(ROOT)  # where the relative case is meant
    _assert_one_line(_run_here(script, _training_argv(script, case, assets), capfd), SOURCES[case][1])


@pytest.mark.slow
def test_training_from_a_hub_id_offline_fails_in_one_line(assets):
    proc = _run("train_tokenizer.py", *_training_argv("train_tokenizer.py", "hub id offline", assets))
    _assert_one_line(proc, SOURCES["hub id offline"][1])


def test_open_source_names_bad_json_and_missing_shards(tmp_path):
    from PIL import Image

    from vqrae.data import DataConfig, open_source

    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (12, 12), (i, 0, 0)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "caption": "a"}\n{"file_name": "1.png", caption}\n')
    cfg = DataConfig(source=str(folder), text_columns=["caption"])
    with pytest.raises(ValueError, match=r"metadata\.jsonl' line 2 is not a JSON object: it must be UTF-8 JSON lines"):
        open_source(cfg, cache_dir=str(tmp_path / "cache"))
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "0.png", "caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"is not UTF-8 \(line 1\)"):  # streamed: checked before the first row
        open_source(DataConfig(source=str(folder), text_columns=["caption"], streaming=True))
    with pytest.raises(ValueError, match=r"shard '.*shard-1\.tar' does not exist \(2 of 2 shards missing\)"):
        open_source(DataConfig(source=str(tmp_path / "shard-{1..2}.tar")))


# ----------------------------------------------------------------------------- eval_tokenizer


def test_eval_without_lpips_weights_names_the_flag(assets, tmp_path):
    proc = _run("eval_tokenizer.py", "--model", assets["vqrae"], "--data", assets["data"], "--no-fid",
                "--device", "cpu", torch_home=str(tmp_path / "empty_hub"))
    line = _assert_one_line(proc, r"cannot get ImageNet alex weights for LPIPS")
    assert "--lpips-backbone" in line and "set lpips_backbone" not in line
    assert proc.stderr == line + "\n"


def test_eval_with_a_mistyped_data_path_is_one_line(assets, monkeypatch, capfd):
    monkeypatch.chdir(ROOT)
    proc = _run_here("eval_tokenizer.py", ["--model", assets["vqrae"], "--data", "./data/shapse", "--no-fid",
                                           "--lpips-backbone", "random", "--device", "cpu"], capfd)
    line = _assert_one_line(proc, r"'\./data/shapse' is not an existing folder or file")
    assert proc.stderr == line + "\n"


# ----------------------------------------------------------------------------- generate.py


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("generate_cli_io", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_writes_each_batch_before_sampling_the_next(cli, assets, tmp_path, monkeypatch, capfd):
    import mllm.inference

    out = tmp_path / "out"
    on_disk, real = [], mllm.inference.generate_images

    def counting(*args, **kwargs):  # the PNGs already written each time the sampler is called
        on_disk.append(sorted(p.name for p in out.iterdir() if p.name != "grid.png"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mllm.inference, "generate_images", counting)
    monkeypatch.setattr(cli, "GRID_MAX", 4)  # the grid is complete after the second batch
    argv = ["--model", assets["model"], "--prompt", "a red circle", "--num-images", "5", "--batch-size", "2",
            "--seed", "3", "--cfg", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    names = [f"000_{j:02d}_a-red-circle.png" for j in range(5)]
    assert on_disk == [[], names[:2], names[:4]]  # three batches, each one's files written before the next
    lines = capfd.readouterr().out.splitlines()
    assert lines == [str(out / n) for n in names] + [f"grid: {out / 'grid.png'}", "seed: 3"]

    # The same images as one generate_images call over all prompts with the same seed and batch size.
    model = load_model(assets["model"])
    want = to_uint8(real(model, ["a red circle"], model.sampling_config(seed=3, cfg_scale=2.0), num_images=5,
                         batch_size=2).images)
    from tests.test_generate_cli import png

    for k, name in enumerate(names):
        assert torch.equal(png(out / name), want[k])
    side = 32 + 2
    assert png(out / "grid.png").shape == (3, 2 * side + 2, 2 * side + 2)  # the first 4 images, 2 x 2


def test_generate_refuses_more_images_than_the_cap(cli, assets, tmp_path, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    capfd.readouterr()
    assert cli.main(["--model", assets["model"], "--prompts", str(prompts), "--num-images", "2049",
                     "--out", str(out)]) == 2
    got = capfd.readouterr()
    assert got.out == "" and got.err == (
        "error: --num-images 2049 for 2 prompt(s) makes 4098 images, more than the 4096 of one run: split the "
        "prompts (or lower --num-images) over several runs with different --out folders\n")
    assert not any(p.suffix == ".png" for p in out.iterdir())


def test_generate_at_the_cap_is_accepted(cli, monkeypatch, assets, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "_run", lambda args, prompts: calls.append(len(prompts) * args.num_images))
    assert cli.main(["--model", assets["model"], "--prompt", "a", "--num-images", str(cli.MAX_IMAGES),
                     "--out", str(tmp_path / "o")]) == 0
    assert calls == [cli.MAX_IMAGES]
