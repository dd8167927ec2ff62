"""The demo (scripts/run_demo.sh) end to end in its quick mode, in a scratch directory laid out like the repo:
data -> stand-in encoder -> tokenizer stages 1 and 2 -> unified model -> generated images and answers -> scores."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_step_and_beats_chance(tmp_path):
    for name in ("scripts", "configs", "vqrae", "mllm", "demo"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = dict(
        os.environ,
        VQRAE_DEMO_QUICK="1",
        VQRAE_DEMO_PORT=str(29500 + os.getpid() % 2000),
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/vqrae_torch_ext"),
    )
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "run_demo.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "demo finished" in proc.stdout
    assert any(f.endswith(".png") for f in os.listdir(tmp_path / "outputs" / "generated"))
    score = json.loads((tmp_path / "outputs" / "demo" / "score.json").read_text())
    tok, gen, und = score["tokenizer"], score["generation"], score["understanding"]
    assert tok["codebook_size"] == 256 and tok["codebook_usage_pct"] > 50
    # held-out pictures decoded from their own codes keep their colour and cell (quick run: 100 % and 100 %)
    assert tok["reconstruction_match"]["colour"] >= 0.8 and tok["reconstruction_match"]["position"] >= 0.9, score
    # Colour, asked and drawn, for held-out pictures and captions ((colour, shape, position) combinations never
    # trained on). 8 colours: chance is 12.5 %; the quick run (600 MLLM steps) answers 100 % of colour questions
    # and draws 91 % of the colours right, the full demo 100 % and 95 %.
    assert und["colour"] >= 0.6 and gen["colour"] >= 0.5, score
    assert und["background"] >= 0.9 and gen["background"] >= 0.7, score  # 2 backgrounds: chance 50 %
    # Images put the shape in the named cell of the 3 x 3 grid (chance 11 %) although that colour-shape pair was
    # never drawn there in training: the quick run places 100 %, the full demo 100 %.
    assert gen["position"] >= 0.6, score
