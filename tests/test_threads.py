"""CPU threads: the usable cores shared among a host's ranks, a user's thread count kept, OpenMP threads that
sleep when idle."""
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from vqrae.runtime.distributed import cpu_threads


@pytest.mark.parametrize("cores, ranks, want", [(2, 1, 2), (2, 2, 1), (16, 3, 5), (1, 4, 1)])
def test_cpu_threads_share_the_usable_cores(cores, ranks, want):
    assert cpu_threads(ranks, cores=cores) == want


def test_a_users_thread_count_wins(single_rank):
    # a fresh interpreter: torch reads OMP_NUM_THREADS when it is first imported
    code = (
        "import torch\n"
        "from vqrae.runtime.distributed import init_distributed\n"
        "init_distributed()\n"
        "print(torch.get_num_threads())\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"


@pytest.mark.parametrize("given, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_when_idle_unless_the_user_says_otherwise(given, want):
    """The packages set OMP_WAIT_POLICY before torch is first imported (the scripts' import order); a user's value
    wins. A fresh interpreter: this process imported torch long ago."""
    code = "import sys, os\nimport mllm\nprint(os.environ.get('OMP_WAIT_POLICY'))\n"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": given} if given else {})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == want
