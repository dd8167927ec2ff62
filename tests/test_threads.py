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


@pytest.fixture(scope="module")
def fresh(single_rank) -> dict:
    """What a fresh interpreter with the user's own OMP_NUM_THREADS and OMP_WAIT_POLICY reports after ``import mllm``
    and ``init_distributed`` (torch reads OMP_NUM_THREADS and OpenMP reads OMP_WAIT_POLICY when torch is first
    imported; this process imported it long ago). Without them: tests/test_imports.py (the policy) and
    tests/test_reliability.py (the thread count of a rank pinned to one core)."""
    code = (
        "import os\n"
        "import mllm\n"
        "import torch\n"
        "from vqrae.runtime.distributed import init_distributed\n"
        "init_distributed()\n"
        "print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads, policy = proc.stdout.strip().splitlines()[-1].split()
    return {"threads": int(threads), "policy": policy}


def test_a_users_thread_count_wins(fresh):
    assert cpu_threads(1) != 1 or os.cpu_count() == 1  # else the test could not tell
    assert fresh["threads"] == 1


def test_a_users_openmp_wait_policy_wins(fresh):
    """The packages set OMP_WAIT_POLICY=PASSIVE before torch is first imported unless the user set it."""
    assert fresh["policy"] == "ACTIVE"
