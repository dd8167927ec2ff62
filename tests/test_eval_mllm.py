"""The lmms-eval model (mllm.lmms) and scripts/eval_mllm.py, on a tiny saved unified model and a tiny held-out
shapes split: batched answers equal mllm.inference's one-at-a-time answers, multiple-choice log-likelihoods equal
a full forward, and the shipped demo_shapes task runs end to end through lmms-eval with the answers and accuracy
of the project's own understanding scorer (scripts/score_demo.py: answer_question, max 4 tokens, exact match)."""
import glob
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("lmms_eval")

from mllm.inference import answer_question, answer_questions, load_model, question_pixels  # noqa: E402
from mllm.lmms import MANIFEST, VQRAELmms, continuation_logprob  # noqa: E402
from demo.shapes import write_imagefolder  # noqa: E402
from tests.helpers import ROOT, error_line, run_script, write_answering_model  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny unified model whose greedy answers are words (varied, so some are right), and a 32 px shapes split."""
    root = tmp_path_factory.mktemp("eval_mllm")
    write_answering_model(root, seed=3)
    write_imagefolder(str(root / "shapes"), 4, 6, seed=0, size=32)
    return {"model": str(root / "model"), "data": str(root / "shapes"), "root": root}


@pytest.fixture(scope="module")
def model(assets):
    return load_model(assets["model"])


def held_out(assets):
    from PIL import Image

    rows = [json.loads(line) for line in open(os.path.join(assets["data"], "test", "metadata.jsonl"))]
    return [(Image.open(os.path.join(assets["data"], "test", r["file_name"])).convert("RGB"), qa["question"], qa["answer"])
            for r in rows for qa in r["questions"]]


def test_batched_answers_are_the_one_at_a_time_answers(assets, model):
    qs = held_out(assets)[:5]
    questions = [q for _, q, _ in qs]
    questions[1] = "What colour is the shape in this picture ?"  # rows of unequal length are left-padded
    images = [img for img, _, _ in qs]
    images[4] = None  # a text-only question in the batch
    alone = [answer_question(model, img, q, max_new_tokens=4) if img is not None else None for img, q in zip(images, questions)]
    batched = answer_questions(model, images, questions, max_new_tokens=4)
    assert batched[:4] == alone[:4] and all(batched)
    assert answer_questions(model, images[4:], questions[4:], max_new_tokens=4) == batched[4:]
    first = batched[0].split()[0]
    assert answer_questions(model, images[:1], questions[:1], max_new_tokens=4, until=[first]) == [""]  # cut before `until`


def test_continuation_logprob_is_the_full_forward_sum(assets, model):
    image, question, _ = held_out(assets)[0]
    greedy = answer_question(model, image, question, max_new_tokens=1)  # one token, like each word below
    logp, is_greedy = continuation_logprob(model, image, question, " " + greedy)
    assert is_greedy
    other = next(w for w in ("red", "blue", "green", "circle") if w != greedy.split()[0])
    logp_other, other_greedy = continuation_logprob(model, image, question, " " + other)
    assert not other_greedy and logp_other < logp <= 0
    # by hand: the answer tokens appended to the prompt, their log-probabilities from one forward
    from mllm import understanding_prompt
    prompt = understanding_prompt(model.tokenizer, model.vocab, question, model.vqrae.num_tokens)
    ans = model.tokenizer.encode(other, add_special_tokens=False)
    ids = torch.tensor([prompt.input_ids + ans])
    mask = torch.tensor([prompt.image_mask + [False] * len(ans)])
    with torch.no_grad():
        logits = model(ids, images=question_pixels(model, image)[None], image_mask=mask).logits[0].float()
    want = sum(torch.log_softmax(logits[len(prompt.input_ids) - 1 + k], -1)[t] for k, t in enumerate(ans))
    assert logp_other == pytest.approx(float(want), abs=1e-4)


def test_lmms_eval_finds_the_model_through_its_entry_point_manifest():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(MANIFEST)
    assert registry.get_model_class("vqrae") is VQRAELmms
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'vqrae = "mllm.lmms:MANIFEST"' in f.read()


def shipped_task_at(tmp, data):
    """eval_tasks/demo_shapes as shipped, its dataset_path pointed at ``data``'s held-out split."""
    folder = tmp / "tasks"
    shutil.copytree(os.path.join(ROOT, "eval_tasks", "demo_shapes"), folder)
    path = folder / "demo_shapes.yaml"
    text = path.read_text()
    assert "dataset_path: data/shapes/test\n" in text
    path.write_text(text.replace("dataset_path: data/shapes/test\n", f"dataset_path: {data}/test\n"))
    return str(folder)


@pytest.mark.slow
def test_demo_shapes_task_through_lmms_eval_scores_like_the_projects_scorer(assets, model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    tasks, out, limit = shipped_task_at(tmp_path, assets["data"]), tmp_path / "out", 12
    code = run_script("eval_mllm.py", ["--model", assets["model"], "--tasks", "demo_shapes", "--limit", str(limit),
                                       "--batch-size", "5", "--include-path", tasks, "--output", str(out), "--log-samples"])
    assert code == 0
    [results] = glob.glob(str(out / "*" / "*_results.json"))  # lmms-eval's usual results file
    with open(results) as f:
        got = json.load(f)
    assert got["config"]["model"] == "vqrae" and got["config"]["limit"] == limit
    accuracy = got["results"]["demo_shapes"]["exact_match,none"]
    [samples] = glob.glob(str(out / "*" / "*demo_shapes*.jsonl"))
    with open(samples) as f:
        rows = [json.loads(line) for line in f]
    answers = {r["doc_id"]: r["filtered_resps"][0] if isinstance(r["filtered_resps"], list) else r["filtered_resps"]
               for r in rows}
    # the project's scorer (scripts/score_demo.py): answer_question, at most 4 tokens, exact lower-case match
    ours = [answer_question(model, img, q, max_new_tokens=4).strip().lower() for img, q, _ in held_out(assets)[:limit]]
    assert [answers[i].strip().lower() for i in range(limit)] == ours
    right = [a == t.lower() for a, (_, _, t) in zip(ours, held_out(assets)[:limit])]
    assert accuracy == pytest.approx(sum(right) / limit)


@pytest.mark.parametrize("case", ["unknown_task", "missing_model"])
def test_bad_input_is_one_line_and_exit_code_2(assets, tmp_path, capfd, case):
    argv = {"unknown_task": ["--model", assets["model"], "--tasks", "demo_shapes,no_such_task"],
            "missing_model": ["--model", str(tmp_path / "absent"), "--tasks", "demo_shapes"]}[case]
    assert run_script("eval_mllm.py", [*argv, "--output", str(tmp_path / "out")]) == 2
    line = error_line(capfd.readouterr().err)
    assert {"unknown_task": "no_such_task", "missing_model": "absent"}[case] in line
