"""What importing the packages costs: no scipy, DeepSpeed or command-line code for the models, and neither
``datasets`` nor pyarrow for inference (scripts/generate.py, scripts/app.py and scripts/chat.py load them only
to train)."""
import subprocess
import sys

from tests.helpers import ROOT


def _loaded(imports: str, prefixes: tuple[str, ...], names: tuple[str, ...] = ()) -> list[str]:
    """The modules of ``prefixes`` (top-level packages) or ``names`` that ``imports`` loads in a fresh interpreter,
    where importing scipy fails."""
    code = (
        "import sys\n"
        "sys.modules['scipy'] = None  # importing it would fail: the packages must not need it\n"
        f"{imports}\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {prefixes!r} or m in {names!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def test_importing_the_packages_needs_no_scipy_deepspeed_or_command_line_code():
    imports = "import vqrae, mllm\nfrom mllm.model import UnifiedModel"
    assert _loaded(imports, ("deepspeed", "demo"), ("vqrae.cli", "vqrae.runtime", "vqrae.train", "mllm.train")) == []


def test_inference_loads_neither_datasets_nor_pyarrow():
    """``import mllm`` and everything scripts/generate.py, scripts/chat.py and scripts/app.py import to answer and
    draw; training data (``mllm.data``) is what needs them."""
    imports = ("import mllm, vqrae.cli\nimport mllm.inference, mllm.chat, mllm.sampling\n"
               "from mllm.inference import load_model, generate_images, answer_question, read_image")
    assert _loaded(imports, ("datasets", "pyarrow")) == []
    assert _loaded("import mllm.data", ("datasets", "pyarrow")) != []  # the test can see them
