import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mllm import SamplingConfig, understanding_prompt
from mllm.chat import chat_answer, chat_prompt, read_chat_image, start_conversation, stream_answer
from mllm.inference import answer_question, load_model
from tests.helpers import run_script, write_answering_model
from demo.shapes import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "chat.py"
STEPS = 6  # answer tokens: a tiny random model rarely stops by itself


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    write_imagefolder(str(root / "shapes"), 4, 2, seed=0, size=32)
    images = sorted(str(p) for p in (root / "shapes" / "test").glob("*.png"))
    return {"model": write_answering_model(root, seed=1, distinct_codes=True), "images": images, "root": root}


@pytest.fixture(scope="module")
def model(assets):
    return load_model(assets["model"])


def test_second_prompt_holds_the_first_turn(model, assets):
    conv = start_conversation(model, read_chat_image(assets["images"][0]))
    first = chat_prompt(model, conv, "What colour is the shape")
    # One question: exactly the prompt answer_question builds.
    assert first.input_ids == understanding_prompt(model.tokenizer, model.vocab, "What colour is the shape",
                                                   model.vqrae.num_tokens).input_ids
    answer = chat_answer(model, conv, "What colour is the shape", max_new_tokens=STEPS)
    assert answer
    conv.add("What colour is the shape", answer)
    second = chat_prompt(model, conv, "Where is the shape")
    text = model.tokenizer.decode(second.input_ids)
    assert "What colour is the shape" in text and answer in text and text.rstrip().count("Where is the shape") == 1
    assert text.index("What colour") < text.index(answer) < text.index("Where is the shape")
    assert sum(second.image_mask) == model.vqrae.num_tokens  # one image, however many turns
    assert second.input_ids[: len(first.input_ids) - 3] == first.input_ids[: len(first.input_ids) - 3]
    conv.reset()
    assert chat_prompt(model, conv, "Where is the shape").input_ids != second.input_ids


def test_stream_joins_to_the_whole_answer(model, assets):
    image = read_chat_image(assets["images"][1])
    conv = start_conversation(model, image)
    pieces = list(stream_answer(model, conv, "What shape is it", max_new_tokens=STEPS))
    assert len(pieces) > 1  # token by token, not one piece at the end
    whole = answer_question(model, image, "What shape is it", max_new_tokens=STEPS)
    assert "".join(pieces) == whole == chat_answer(model, conv, "What shape is it", max_new_tokens=STEPS)
    conv.add("What shape is it", whole)
    second = "".join(stream_answer(model, conv, "How big is the shape", max_new_tokens=STEPS))
    assert second == chat_answer(model, conv, "How big is the shape", max_new_tokens=STEPS)
    # Sampled answers draw the same tokens from the same seed.
    hot = SamplingConfig(temperature=1.0, cfg_scale=1.0, seed=3)
    streamed = "".join(stream_answer(model, conv, "How big is the shape", max_new_tokens=STEPS, sampling=hot))
    assert streamed == chat_answer(model, conv, "How big is the shape", max_new_tokens=STEPS, sampling=hot)


def test_bad_inputs_are_one_line_errors(model, assets, tmp_path):
    conv = start_conversation(model, read_chat_image(assets["images"][0]))
    with pytest.raises(ValueError, match="question is empty"):
        stream_answer(model, conv, "   ")
    too_long = " ".join(["circle"] * model.llm.config.max_position_embeddings)
    with pytest.raises(ValueError, match="start a new conversation"):
        stream_answer(model, conv, too_long)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 4100)).save(huge)  # 20.5 MP, a few kB on disk
    for path, words in [(corrupt, "cannot use this image"), (huge, "more than 20 megapixels"),
                        (tmp_path / "none.png", "no image file")]:
        with pytest.raises(ValueError, match=words) as err:
            read_chat_image(str(path))
        assert "\n" not in str(err.value)


def test_terminal_chat_answers_questions_from_stdin(model, assets):
    first, second = assets["images"]
    conv = start_conversation(model, read_chat_image(first))
    want1 = chat_answer(model, conv, "What colour is the shape", max_new_tokens=STEPS)
    conv.add("What colour is the shape", want1)
    want2 = chat_answer(model, conv, "Where is the shape", max_new_tokens=STEPS)
    fresh = start_conversation(model, read_chat_image(second))
    other = chat_answer(model, fresh, "Where is the shape", max_new_tokens=STEPS)

    lines = ["What colour is the shape", "", "Where is the shape", "/image missing.png", f"/image {second}",
             "Where is the shape", "/quit", "never"]
    script = "\n".join(lines) + "\n"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--image", first, "--model", assets["model"], "--max-new-tokens", str(STEPS)],
        input=script, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    # stdout holds the answers only, one line each; after /quit nothing more is read.
    assert proc.stdout.splitlines() == [want1, want2, other]
    assert "error: no image file at 'missing.png'" in proc.stderr


def test_terminal_chat_rejects_a_bad_start(assets, tmp_path, capfd):
    """Run in this process (``run_script``): the errors come before the model loads or a line is read. The answering
    test above runs the script in a real interpreter."""
    def run(*args) -> tuple[int, str]:
        capfd.readouterr()
        code = run_script("chat.py", list(args))
        return code, capfd.readouterr().err

    code, err = run("--image", str(tmp_path / "none.png"), "--model", assets["model"])
    assert code == 2 and err == f"error: no image file at '{tmp_path / 'none.png'}'\n"
    code, err = run("--image", assets["images"][0], "--model", str(tmp_path / "nomodel"))
    assert code == 2 and "no model directory" in err and err.count("\n") == 1 and err.endswith("\n")
