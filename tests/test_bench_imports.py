"""The benchmarks and studies run only by hand (or on a GPU): at least their imports must match the packages."""
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_every_benchmark_and_study_imports_against_the_current_packages():
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "bench")) if f.endswith(".py"))
    studies = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "scripts", "experiments")) if f.endswith(".py"))
    # a fresh interpreter: the benchmarks put their own folders on sys.path and may set the environment
    code = "import importlib, sys\nsys.path[:0] = ['bench', 'scripts/experiments', '.']\n" + "".join(
        f"importlib.import_module({n!r})\n" for n in names + studies)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(names) >= 8 and len(studies) >= 2
