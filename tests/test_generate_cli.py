import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllm import SamplingConfig, add_image_tokens, generate_image_codes, pad_token_id
from mllm.inference import (
    GeneratedImages, answer_question, build_generation_prompts, generate_images, grid_layout, image_file_name,
    image_grid, load_model, max_prompt_tokens, read_image, save_images, stop_ids, to_uint8,
)
from mllm.prompts import generation_prompt_ids, generation_prompts, understanding_prompt
from tests.helpers import CODEBOOK_SIZE as K
from tests.helpers import NUM_TOKENS as N
from tests.helpers import make_llm, make_tokenizer, write_answering_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate.py"
SIDE = 32  # the tiny VQRAE's image side


def replace_dir(path: Path, save) -> None:
    shutil.rmtree(path)
    save(str(path))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A saved tiny unified model, plus copies whose tokenizer disagrees with the VQRAE or the LLM."""
    root = tmp_path_factory.mktemp("cli")
    write_answering_model(root, seed=1, distinct_codes=True)

    small_codebook = make_tokenizer()
    add_image_tokens(small_codebook, 32)
    shutil.copytree(root / "model", root / "codebook_mismatch")
    replace_dir(root / "codebook_mismatch" / "tokenizer", small_codebook.save_pretrained)
    shutil.copytree(root / "model", root / "rows_mismatch")  # an LLM without rows for the image tokens
    replace_dir(root / "rows_mismatch" / "llm", make_llm("llama", len(make_tokenizer())).save_pretrained)
    return {name: str(root / name) for name in ("model", "codebook_mismatch", "rows_mismatch")}


@pytest.fixture(scope="module")
def model(dirs):
    return load_model(dirs["model"])


@pytest.fixture(scope="module")
def max_pos(model):
    return model.llm.config.max_position_embeddings


@pytest.fixture(scope="module")
def cli():
    """scripts/generate.py as a module: main(argv) runs in-process, without a new interpreter's imports."""
    spec = importlib.util.spec_from_file_location("generate_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png(path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def grid_side(count: int, side: int = SIDE, pad: int = 2) -> int:
    return count * (side + pad) + pad


# ----------------------------------------------------------------------------- mllm.inference, in-process


def test_load_model_is_eval_float32_and_rejects_bad_input(dirs, model, max_pos):
    assert not model.training and model.llm.dtype == torch.float32 and model.vocab.codebook_size == K
    assert max_prompt_tokens(model) == max_pos - N - 1
    with pytest.raises(FileNotFoundError, match="no model directory"):
        load_model(dirs["model"] + "_missing")
    with pytest.raises(ValueError, match="dtype"):
        load_model(dirs["model"], dtype="int8")
    bf16 = load_model(dirs["model"], dtype="bfloat16")
    assert bf16.llm.dtype == torch.bfloat16 and next(bf16.vqrae.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name, words", [("codebook_mismatch", "32 image code tokens.*64 codes"),
                                         ("rows_mismatch", "rows but the tokenizer has")])
def test_load_model_rejects_mismatched_tokenizer(dirs, name, words):
    with pytest.raises(ValueError, match=words) as err:
        load_model(dirs[name])
    assert "\n" not in str(err.value)


def test_prompts_are_the_training_prompts_and_length_limited(model):
    tok = model.tokenizer
    captions = ["a red circle", "a blue square on the left"]
    ids = build_generation_prompts(model, captions)
    assert ids == generation_prompts(tok, captions)
    assert build_generation_prompts(model, captions, "green star").uncond == generation_prompt_ids(tok, "green star")
    overhead = len(generation_prompt_ids(tok, "circle")) - 1  # template tokens around a one-word caption
    limit = max_prompt_tokens(model)
    fits = " ".join(["circle"] * (limit - overhead))
    assert len(build_generation_prompts(model, [fits]).cond[0]) == limit
    with pytest.raises(ValueError, match=f"{limit + 1} tokens but this model takes at most {limit}"):
        build_generation_prompts(model, [fits + " circle"])
    with pytest.raises(ValueError, match="negative prompt"):
        build_generation_prompts(model, ["circle"], fits + " circle")
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        build_generation_prompts(model, ["circle", "  "])


@pytest.mark.parametrize("cfg_scale, negative", [(3.0, None), (3.0, "green star"), (1.0, None)])
def test_generate_images_is_the_sampler_then_the_decoder(model, cfg_scale, negative):
    captions = ["a red circle", "a blue square on the left"]
    sampling = SamplingConfig(cfg_scale=cfg_scale, seed=5)
    out = generate_images(model, captions, sampling, num_images=3, negative_prompt=negative, batch_size=4)
    assert out.images.shape == (6, 3, SIDE, SIDE) and out.codes.shape == (6, N)
    assert out.images.min() >= -1 and out.images.max() <= 1

    # The same rows through mllm.sample in the same batches, one generator drawn from across batches.
    prompts = generation_prompts(model.tokenizer, captions)
    uncond = generation_prompt_ids(model.tokenizer, negative or "")
    rows = [prompts.cond[0]] * 3 + [prompts.cond[1]] * 3
    generator = torch.Generator().manual_seed(5)
    want = torch.cat([
        generate_image_codes(model.llm, rows[s : s + 4], model.vocab, model.vqrae.num_tokens, sampling,
                             uncond_ids=[uncond] if cfg_scale != 1 else None,
                             pad_id=pad_token_id(model.tokenizer), generator=generator)
        for s in (0, 4)
    ])
    assert torch.equal(out.codes, want)
    assert torch.equal(out.images, model.decode_image_codes(want).clamp(-1, 1))


def test_generate_images_seed_decides_the_images(model):
    def run(seed):
        return generate_images(model, ["a red circle"], SamplingConfig(cfg_scale=2.0, seed=seed), num_images=2).codes

    first = run(1)
    assert torch.equal(run(1), first)
    assert not torch.equal(run(2), first)
    assert not torch.equal(first[0], first[1])  # images of one prompt differ from each other
    with pytest.raises(ValueError, match="num_images"):
        generate_images(model, ["a red circle"], SamplingConfig(), num_images=0)


def test_to_uint8_and_grid_known_values():
    assert to_uint8(torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])).tolist() == [0, 0, 128, 191, 255, 255]
    images = torch.randint(0, 255, (5, 3, 4, 6), dtype=torch.uint8)
    grid = image_grid(images, columns=2, padding=1)
    assert grid.shape == (3, 3 * 5 + 1, 2 * 7 + 1)
    covered = torch.zeros(grid.shape[1:], dtype=torch.bool)
    for k in range(5):
        y, x = 1 + (k // 2) * 5, 1 + (k % 2) * 7
        assert torch.equal(grid[:, y : y + 4, x : x + 6], images[k])
        covered[y : y + 4, x : x + 6] = True
    assert bool((grid[:, ~covered] == 255).all())  # padding and the empty sixth tile
    assert [grid_layout(1, n)[1] for n in (1, 2, 4, 5, 9)] == [1, 2, 2, 3, 3]
    assert grid_layout(3, 2) == (6, 2)
    # scripts/generate.py shows at most GRID_MAX: whole prompt rows, else the first images near-square
    assert grid_layout(3, 4, max_shown=10) == (8, 4)
    assert grid_layout(1, 300, max_shown=256) == (256, 16)
    assert grid_layout(2, 300, max_shown=256) == (256, 16)


def test_save_images_writes_exact_pixels(tmp_path):
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    saved = save_images(GeneratedImages(images, torch.zeros(4, 2), ["A red circle!", "?"], 2), str(tmp_path / "o"))
    assert [os.path.basename(p) for p in saved.paths] == [
        "000_00_a-red-circle.png", "000_01_a-red-circle.png", "001_00.png", "001_01.png"]
    assert [os.path.basename(p) for p in saved.paths] == [image_file_name(i, j, p) for i, p in enumerate(
        ["A red circle!", "?"]) for j in range(2)]  # the names scripts/generate.py writes
    for k, path in enumerate(saved.paths):
        assert torch.equal(png(path), to_uint8(images[k]))
    assert torch.equal(png(saved.grid), image_grid(to_uint8(images), 2))


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image file"):
        read_image(str(tmp_path / "missing.png"))
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="not an image"):
        read_image(str(tmp_path / "junk.png"))


@torch.no_grad()
def test_answer_matches_greedy_full_forward(model, max_pos):
    image = torch.rand(3, SIDE, SIDE) * 2 - 1
    question, steps = "what shape is in the image", 12
    prompt = understanding_prompt(model.tokenizer, model.vocab, question, N)
    embeds = model.embed(torch.tensor([prompt.input_ids]), image[None], torch.tensor([prompt.image_mask]))
    stops, tokens = set(stop_ids(model)), []
    for _ in range(steps):  # no cache: the whole sequence again at every step
        seq = torch.cat([embeds, model.llm.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))], 1)
        token = int(model.llm(inputs_embeds=seq).logits[0, -1].argmax())
        if token in stops:
            break
        tokens.append(token)
    want = model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert want and answer_question(model, image, question, max_new_tokens=steps) == want

    pil = Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy())
    assert answer_question(model, pil, question, max_new_tokens=steps) == answer_question(
        model, to_uint8(image).float() / 127.5 - 1, question, max_new_tokens=steps)
    # The answer budget shrinks to the positions left; a question that leaves none is an error.
    long_question = " ".join(["circle"] * (max_pos - len(prompt.input_ids) + len(question.split()) - 3))
    room = max_pos - len(understanding_prompt(model.tokenizer, model.vocab, long_question, N).input_ids)
    assert room == 3
    capped = answer_question(model, image, long_question, max_new_tokens=max_pos)
    assert 1 <= len(model.tokenizer.encode(capped, add_special_tokens=False)) <= room
    with pytest.raises(ValueError, match=f"at most {max_pos} positions"):
        answer_question(model, image, " ".join(["circle"] * max_pos), max_new_tokens=1)


def test_stop_ids_are_eos_and_turn_end(model):
    vocab = model.tokenizer.get_vocab()
    assert {vocab["</s>"], vocab["<|im_end|>"]} <= set(stop_ids(model))
    assert not set(stop_ids(model)) & {vocab["<|im_start|>"], *model.vocab.code_ids}


# ----------------------------------------------------------------------------- the script, in-process


def test_cli_writes_images_and_grid_reproducibly(cli, dirs, tmp_path, capfd):
    def run(seed, out):
        argv = ["--model", dirs["model"], "--prompt", "a red circle", "--num-images", "3", "--seed", str(seed),
                "--out", str(tmp_path / out), "--cfg", "2.5", "--top-k", "20"]
        assert cli.main(argv) == 0
        return sorted((tmp_path / out).iterdir())

    first = run(1, "a")
    lines = capfd.readouterr().out.splitlines()
    assert [p.name for p in first] == ["000_00_a-red-circle.png", "000_01_a-red-circle.png", "000_02_a-red-circle.png",
                                       "grid.png"]
    assert lines == [str(p) for p in first[:3]] + [f"grid: {first[3]}", "seed: 1"]
    assert all(png(p).shape == (3, SIDE, SIDE) for p in first[:3])
    assert png(first[3]).shape == (3, grid_side(2), grid_side(2))  # 3 images, 2 columns
    same, other = run(1, "b"), run(2, "c")
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(first, same))
    assert all(p.read_bytes() != q.read_bytes() for p, q in zip(first, other))


def test_cli_prompts_file_gives_num_images_per_prompt(cli, dirs, tmp_path, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \ngreen star\n")
    argv = ["--model", dirs["model"], "--prompts", str(prompts), "--num-images", "2", "--batch-size", "4",
            "--out", str(tmp_path / "out"), "--negative-prompt", "car"]
    assert cli.main(argv) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["000_00_a-red-circle.png", "000_01_a-red-circle.png", "001_00_a-blue-square.png",
                     "001_01_a-blue-square.png", "002_00_green-star.png", "002_01_green-star.png", "grid.png"]
    assert png(tmp_path / "out" / "grid.png").shape == (3, grid_side(3), grid_side(2))  # a row per prompt
    assert capfd.readouterr().err == ""


def test_cli_answers_a_question(cli, dirs, tmp_path, capfd):
    path = tmp_path / "q.png"
    Image.fromarray(torch.randint(0, 255, (48, 40, 3), dtype=torch.uint8).numpy()).save(path)
    assert cli.main(["--model", dirs["model"], "--image", str(path), "--prompt", "what is the shape",
                     "--max-new-tokens", "6"]) == 0
    out = capfd.readouterr()
    assert out.out.strip() and len(out.out.strip().split()) <= 6 and out.err == ""


def _bad_inputs(tmp: Path, dirs: dict) -> dict[str, list[str]]:
    (tmp / "empty.txt").write_text("\n   \n")
    (tmp / "junk.png").write_bytes(b"\x89PNG but not really")
    (tmp / "a_file").write_text("x")
    model = ["--model", dirs["model"]]
    gen = model + ["--prompt", "a red circle"]
    return {
        "empty prompt": model + ["--prompt", ""],
        "blank prompt": model + ["--prompt", "   "],
        "over-long prompt": model + ["--prompt", " ".join(["circle"] * 1000)],  # beyond any tiny LLM's positions
        "unknown model dir": ["--model", str(tmp / "nowhere"), "--prompt", "a red circle"],
        "default model missing": ["--prompt", "a red circle"],
        "codebook mismatch": ["--model", dirs["codebook_mismatch"], "--prompt", "a red circle"],
        "llm rows mismatch": ["--model", dirs["rows_mismatch"], "--prompt", "a red circle"],
        "negative temperature": gen + ["--temperature", "-0.5"],
        "top-p zero": gen + ["--top-p", "0"],
        "top-p above one": gen + ["--top-p", "1.5"],
        "negative cfg": gen + ["--cfg", "-1"],
        "nan cfg": gen + ["--cfg", "nan"],
        "negative top-k": gen + ["--top-k", "-1"],
        "zero images": gen + ["--num-images", "0"],
        "not an int": gen + ["--num-images", "two"],
        "missing image": gen + ["--image", str(tmp / "missing.png")],
        "unreadable image": gen + ["--image", str(tmp / "junk.png")],
        "missing prompts file": model + ["--prompts", str(tmp / "missing.txt")],
        "empty prompts file": model + ["--prompts", str(tmp / "empty.txt")],
        "unwritable out": gen + ["--out", str(tmp / "a_file" / "sub")],
        "nothing to do": model,
        "unknown flag": gen + ["--steps", "3"],
        "unknown decoding": gen + ["--decoding", "beam"],
        "zero window": gen + ["--decoding", "jacobi", "--window", "0"],
        "window longer than the image": gen + ["--decoding", "jacobi", "--window", "999"],
        "jacobi compiled": gen + ["--decoding", "jacobi", "--compile"],
        "decoding for an answer": gen + ["--image", str(tmp / "junk.png"), "--window", "4"],
    }


BAD = [  # the keys of _bad_inputs
    "empty prompt", "blank prompt", "over-long prompt", "unknown model dir", "default model missing",
    "codebook mismatch", "llm rows mismatch", "negative temperature", "top-p zero", "top-p above one",
    "negative cfg", "nan cfg", "negative top-k", "zero images", "not an int", "missing image", "unreadable image",
    "missing prompts file", "empty prompts file", "unwritable out", "nothing to do", "unknown flag",
    "unknown decoding", "zero window", "window longer than the image", "jacobi compiled", "decoding for an answer",
]


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_input_is_one_line_and_exit_code_2(cli, dirs, tmp_path, monkeypatch, capfd, case):
    cases = _bad_inputs(tmp_path, dirs)
    assert sorted(cases) == sorted(BAD)
    argv = cases[case]
    monkeypatch.chdir(tmp_path)  # the default model path is relative: make sure nothing is found there
    assert cli.main(argv) == 2
    out = capfd.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and out.err.endswith("\n"), out.err
    if case == "default model missing":
        assert "bash scripts/run_demo.sh" in lines[0]


# ----------------------------------------------------------------------------- the script, as users run it


@pytest.mark.slow
def test_script_subprocess_writes_pngs_and_grid(dirs, tmp_path):
    """A real interpreter: exit code 0, only the paths on stdout, nothing on stderr (warnings, progress bars or
    log lines would show up here, not in-process)."""
    out_dir = tmp_path / "o"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", dirs["model"], "--prompt", "a red circle", "--num-images", "5",
         "--batch-size", "2", "--seed", "3", "--out", str(out_dir)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert run.returncode == 0 and run.stderr == "", run.stderr
    images = [out_dir / f"000_{j:02d}_a-red-circle.png" for j in range(5)]
    assert run.stdout.splitlines() == [str(p) for p in images] + [f"grid: {out_dir / 'grid.png'}", "seed: 3"]
    assert all(png(p).shape == (3, SIDE, SIDE) for p in images)
    assert png(out_dir / "grid.png").shape == (3, grid_side(2), grid_side(3))  # 5 images: 3 columns, 2 rows


def test_script_subprocess_bad_input_fails_fast():
    run = subprocess.run([sys.executable, str(SCRIPT), "--prompt", "a red circle", "--top-p", "0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: --top-p must be in (0, 1], got 0.0\n"


def _with_sampling(src: str, dst: Path, **sampling) -> str:
    import yaml

    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "mllm.yaml").read_text())
    cfg["sampling"] = {**cfg["sampling"], **sampling}
    (dst / "mllm.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(dst)


def test_cli_samples_with_the_models_own_defaults_unless_told(cli, dirs, tmp_path, capfd):
    greedy = _with_sampling(dirs["model"], tmp_path / "greedy", temperature=0.0, cfg_scale=1.5)

    def run(seed, out, *flags):
        argv = ["--model", greedy, "--prompt", "a red circle", "--num-images", "2", "--seed", str(seed),
                "--out", str(tmp_path / out), *flags]
        assert cli.main(argv) == 0
        return [png(p) for p in sorted((tmp_path / out).iterdir())[:2]]

    loaded = load_model(greedy)
    assert loaded.sampling_config(seed=3) == SamplingConfig(temperature=0.0, cfg_scale=1.5, seed=3)
    want = generate_images(loaded, ["a red circle"], SamplingConfig(temperature=0.0, cfg_scale=1.5), num_images=2)
    a, b = run(1, "a"), run(2, "b")  # greedy: the seed changes nothing
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, to_uint8(want.images)))
    c, d = run(1, "c", "--temperature", "1"), run(2, "d", "--temperature", "1")  # a flag wins over the default
    assert not all(torch.equal(x, y) for x, y in zip(c, d))
    jacobi = run(1, "j", "--decoding", "jacobi", "--window", "5")  # greedy Jacobi decoding: the same images
    assert all(torch.equal(x, y) for x, y in zip(a, jacobi))
    capfd.readouterr()

    bad = _with_sampling(dirs["model"], tmp_path / "bad", top_p=0.0)
    assert cli.main(["--model", bad, "--prompt", "a red circle", "--out", str(tmp_path / "e")]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error:") and "top_p" in err and "\n" not in err
