"""Generation runs (mllm.gen_eval, scripts/eval_generation.py): prompt files, the layouts the public evaluators
read, seeded resumable runs, run identity, and FID/KID/IS/precision/recall through torch-fidelity.

The layouts checked here, as the evaluators' repositories document them:
- GenEval (github.com/djghosh13/geneval, README "Image generation" and evaluation/evaluate_images.py): the
  output folder holds one folder per line of prompts/evaluation_metadata.jsonl, named by the line's index as
  5 digits ("00000"), with metadata.jsonl (that line, as given) and samples/ holding "0000.png", "0001.png", ...
- DPG-Bench (github.com/TencentQQGYLab/ELLA, dpg_bench/compute_dpg_bench.py): one image per prompt file
  prompts/<item_id>.txt, named <item_id>.png, holding 4 samples as a 2 x 2 grid that the evaluator cuts into
  equal tiles (no padding).
Inception weights are random (built offline, as in tests/test_metrics.py): the metrics' plumbing, not their scale.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mllm import MLLMConfig, UnifiedModel
from mllm import gen_eval
from tests.helpers import error_line, run_script, write_llm, write_random_inception, write_vqrae

GENEVAL_LINES = [  # the first lines of GenEval's prompts/evaluation_metadata.jsonl
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "toilet", "count": 1}, {"class": "computer keyboard", "count": 1}],
     "exclude": [], "prompt": "a photo of a toilet and a computer keyboard"},
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
]


def fake_draw(text, n, generator):
    """Images that depend on the generator only: (n, 3, 8, 8) uint8."""
    return torch.randint(0, 256, (n, 3, 8, 8), generator=generator, dtype=torch.uint8)


def png(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture
def geneval_file(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_LINES))
    return str(path)


def test_geneval_layout_is_per_prompt_folders_with_the_metadata_line(tmp_path, geneval_file):
    items = gen_eval.read_prompts(geneval_file, "geneval")
    assert [it.text for it in items] == [r["prompt"] for r in GENEVAL_LINES]
    out = tmp_path / "out"
    out.mkdir()
    assert gen_eval.run_prompts(items, str(out), "geneval", 3, 0, fake_draw) == (3, 0)
    assert sorted(os.listdir(out)) == ["00000", "00001", "00002"]
    for i, line in enumerate(GENEVAL_LINES):
        folder = out / f"{i:05d}"
        assert sorted(os.listdir(folder)) == ["metadata.jsonl", "samples"]
        assert [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()] == [line]
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png", "0002.png"]
        want = fake_draw("", 3, torch.Generator().manual_seed(i)).permute(0, 2, 3, 1).numpy()
        assert all(np.array_equal(png(folder / "samples" / f"{k:04d}.png"), want[k]) for k in range(3))


def test_dpg_layout_is_a_2x2_grid_named_by_item_id(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for item in ("partiprompts10", "coco2"):
        (prompts / f"{item}.txt").write_text(f"a prompt for {item}\n")
    items = gen_eval.read_prompts(str(prompts), "dpg")
    assert [(it.name, it.text) for it in items] == [("coco2", "a prompt for coco2"), ("partiprompts10", "a prompt for partiprompts10")]
    out = tmp_path / "out"
    out.mkdir()
    gen_eval.run_prompts(items, str(out), "dpg", 4, 5, fake_draw)
    assert sorted(os.listdir(out)) == ["coco2.png", "partiprompts10.png"]
    grid = png(out / "coco2.png")
    tiles = fake_draw("", 4, torch.Generator().manual_seed(5 * 1_000_003)).permute(0, 2, 3, 1).numpy()
    assert grid.shape == (16, 16, 3)  # 2 x 2 tiles of 8 px, no padding: the evaluator cuts equal tiles
    for k in range(4):
        r, c = divmod(k, 2)
        assert np.array_equal(grid[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], tiles[k])
    with pytest.raises(ValueError, match="must be 4"):
        gen_eval.run_prompts(items, str(out), "dpg", 2, 0, fake_draw)
    images, texts = gen_eval.load_generated(str(out), items, "dpg", 4)
    assert len(images) == 8 and np.array_equal(images[0], tiles[0].transpose(2, 0, 1)) and texts[0] == "a prompt for coco2"


@pytest.mark.parametrize("layout", ["geneval", "folder"])
def test_a_rerun_skips_finished_prompts_and_redraws_partial_ones_identically(tmp_path, geneval_file, layout):
    items = gen_eval.read_prompts(geneval_file, layout)
    out = tmp_path / "out"
    out.mkdir()
    gen_eval.run_prompts(items, str(out), layout, 2, 1, fake_draw)
    files = {it.name: gen_eval.item_files(str(out), it, layout, 2) for it in items}
    before = {p: png(p) for fs in files.values() for p in fs}
    # prompt 1 interrupted: one sample missing (and, for GenEval, its metadata line never written)
    os.remove(files["00001"][1])
    if layout == "geneval":
        os.remove(out / "00001" / "metadata.jsonl")
    calls = []
    drawn = gen_eval.run_prompts(items, str(out), layout, 2, 1, lambda t, n, g: calls.append(t) or fake_draw(t, n, g))
    assert drawn == (1, 2) and calls == [items[1].text]
    assert all(np.array_equal(png(p), v) for p, v in before.items())  # the image a whole run draws


def test_prompt_rows_without_text_and_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"tag": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2 has no prompt text"):
        gen_eval.read_prompts(str(bad), "geneval")
    with pytest.raises(FileNotFoundError):
        gen_eval.read_prompts(str(tmp_path / "absent.jsonl"), "folder")
    empty = tmp_path / "prompts"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="a.txt has no prompt text"):
        gen_eval.read_prompts(str(empty), "dpg")


def test_an_output_folder_holding_another_run_is_refused(tmp_path):
    out = str(tmp_path / "out")
    record = {"model": "a", "model_fingerprint": "1", "seed": 0}
    gen_eval.claim_output(out, record)
    gen_eval.claim_output(out, record)  # the same run resumes
    with pytest.raises(ValueError, match="another model's run"):
        gen_eval.claim_output(out, {**record, "model_fingerprint": "2"})
    with pytest.raises(ValueError, match="other seed"):
        gen_eval.claim_output(out, {**record, "seed": 1})


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    write_random_inception(str(path))
    return str(path)


def _shapes(seed, n, colour):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.zeros((3, 32, 32), dtype=np.uint8)
        y, x = rng.integers(0, 20, 2)
        img[:, y:y + 12, x:x + 12] = np.array(colour, dtype=np.uint8)[:, None, None]
        out.append(img)
    return out


def test_missing_inception_or_clip_weights_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ValueError, match="--inception-weights") as err:
        gen_eval.inception_weights_path(None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--clip"):
        gen_eval.clip_score([], [], str(tmp_path / "no_clip"))


def test_fingerprint_tells_retrained_weights_of_the_same_size_apart(tmp_path):
    big = gen_eval.FINGERPRINT_WHOLE + 3 * (1 << 20)  # a weights file read in samples, not whole
    folders = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"hidden": 8}')
        (tmp_path / name / "model.safetensors").write_bytes(np.random.default_rng(seed).bytes(big))
        folders.append(gen_eval.model_fingerprint(str(tmp_path / name)))
    assert folders[0] == folders[1] != folders[2]  # same bytes: same model; other weights of the same size: another
    (tmp_path / "b" / "config.json").write_text('{"hidden": 9}')
    assert gen_eval.model_fingerprint(str(tmp_path / "b")) != folders[0]
    assert gen_eval.model_fingerprint("org/model") == "org/model"  # a hub id names itself


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP saved as a user would save a downloaded one (byte-level BPE vocabulary, no merges)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = tmp_path_factory.mktemp("clip")
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, **tiny),
                     vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(path))
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))).save_pretrained(str(path))
    return str(path)


def test_clip_score_is_the_mean_clamped_cosine_of_each_image_with_its_prompt(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = [np.random.default_rng(i).integers(0, 256, (3, 32, 32), dtype=np.uint8) for i in range(3)]
    prompts = ["a red square", "a blue circle on the left", "green"]
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    expected = []
    for img, text in zip(images, prompts):  # one pair at a time, through the two towers separately
        pixels = processor(images=Image.fromarray(img.transpose(1, 2, 0)), return_tensors="pt")["pixel_values"]
        ids = processor(text=[text], return_tensors="pt")
        with torch.no_grad():
            a = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
            b = model.text_projection(model.text_model(**ids).pooler_output)
        expected.append(100 * max(float(torch.nn.functional.cosine_similarity(a, b)), 0.0))
    assert any(e > 0 for e in expected)  # not all clamped away: the cosines are compared
    got = gen_eval.clip_score(images, prompts, clip_dir, batch_size=2)  # batches padded to their longest prompt
    assert got == pytest.approx(sum(expected) / 3, abs=1e-3)
    with pytest.raises(ValueError, match="one prompt per image"):
        gen_eval.clip_score(images, prompts[:2], clip_dir)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_gen")
    cfg = MLLMConfig(llm=write_llm(root / "llm", "qwen3"), vqrae=write_vqrae(root / "vqrae"), dtype="float32",
                     new_token_noise=0.05)
    torch.manual_seed(0)
    UnifiedModel.build(cfg).save_pretrained(str(root / "model"))
    torch.manual_seed(1)
    UnifiedModel.build(cfg).save_pretrained(str(root / "other"))
    return str(root / "model"), str(root / "other")


def test_script_draws_resumes_scores_and_refuses_another_models_folder(tiny_model, geneval_file, inception_file,
                                                                       tmp_path, capfd, no_downloads):
    model, other = tiny_model
    out = tmp_path / "out"
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(_shapes(0, 6, (0, 0, 255))):
        Image.fromarray(img.transpose(1, 2, 0)).save(ref / f"{i}.png")
    common = ["--prompts", geneval_file, "--layout", "geneval", "--samples", "2", "--batch-size", "2", "--seed", "3",
              "--output", str(out), "--cfg", "1", "--temperature", "1", "--top-k", "0"]
    assert run_script("eval_generation.py", ["--model", model, *common]) == 0
    first = {p: png(p) for p in sorted(out.glob("*/samples/*.png"))}
    assert len(first) == 6 and json.loads((out / "run.json").read_text())["samples"] == 2
    capfd.readouterr()
    assert run_script("eval_generation.py", ["--model", model, *common, "--reference", str(ref),
                                              "--inception-weights", inception_file]) == 0
    assert "0 prompts drawn, 3 already finished" in capfd.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generated_images"] == 6 and metrics["reference_images"] == 6 and math.isfinite(metrics["fid"])
    assert {p: png(p) for p in sorted(out.glob("*/samples/*.png"))}.keys() == first.keys()
    assert run_script("eval_generation.py", ["--model", other, *common]) == 2
    assert "another model's run" in error_line(capfd.readouterr().err)


@pytest.mark.parametrize("case", ["no_text", "no_inception", "no_clip", "dpg_samples"])
def test_script_bad_input_is_one_line_and_exit_code_2(tiny_model, tmp_path, capfd, monkeypatch, case):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle"}) + "\n" + (json.dumps({"prompt": ""}) + "\n" if case == "no_text" else ""))
    extra = {"no_text": [], "no_inception": ["--reference", str(tmp_path)], "no_clip": ["--clip", str(tmp_path / "clip")],
             "dpg_samples": ["--layout", "dpg", "--samples", "2"]}[case]
    argv = ["--model", tiny_model[0], "--prompts", str(prompts), "--output", str(tmp_path / "out"), *extra]
    assert run_script("eval_generation.py", argv) == 2
    line = error_line(capfd.readouterr().err)
    assert {"no_text": "line 2 has no prompt text", "no_inception": "--inception-weights", "no_clip": "--clip",
            "dpg_samples": "must be 4"}[case] in line
    assert not (tmp_path / "out").exists()  # nothing drawn before the inputs are known to be usable
