"""The shared training runtime (``vqrae.runtime``): its layout, and the metrics window both training loops log
through."""
import ast
import math
import os

import pytest
import torch

from tests.helpers import ROOT
from vqrae.runtime.config import OptimConfig, RunConfig, TrainingError, check_run_config, world_sizes
from vqrae.runtime.distributed import all_reduce_sum, from_rank0, gather, host_any
from vqrae.runtime.guard import NonFiniteGuard
from vqrae.runtime.log import MetricsWindow, first_line
from vqrae.runtime.session import SaveSchedule, due

PACKAGE = os.path.join(ROOT, "vqrae", "runtime")
MODULES = sorted(f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py") and f != "__init__.py")
CPU = torch.device("cpu")


# -- layout -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODULES)
def test_every_module_fits_in_300_lines(name):
    with open(os.path.join(PACKAGE, f"{name}.py")) as f:
        assert len(f.read().splitlines()) <= 300


def _runtime_imports(name: str) -> set[str]:
    """The runtime modules that module ``name`` imports, at any depth of its code."""
    with open(os.path.join(PACKAGE, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vqrae.runtime"):
            found.add(node.module.split(".")[2] if node.module.count(".") >= 2 else node.names[0].name)
    return found & set(MODULES)


def test_the_modules_import_each_other_without_cycles():
    """Each module's imports of its siblings (top level or inside functions) form no cycle: there is an order in
    which every module needs only the ones before it."""
    deps = {name: _runtime_imports(name) for name in MODULES}
    order: list[str] = []
    while len(order) < len(MODULES):
        ready = [n for n in MODULES if n not in order and deps[n] <= set(order)]
        assert ready, f"an import cycle among {sorted(set(MODULES) - set(order))}: {deps}"
        order += ready


def test_the_package_re_exports_nothing():
    """The package's ``__init__`` is its docstring alone: callers import from the module that defines a name.
    (Every module loads without DeepSpeed: tests/test_imports.py.)"""
    with open(os.path.join(PACKAGE, "__init__.py")) as f:
        body = ast.parse(f.read()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), body


# -- config and collectives in a lone process ------------------------------------------------------------------------
def test_world_sizes_keep_the_global_batch_and_name_them_in_the_error():
    assert world_sizes(64, 8) == [1, 2, 4, 8] and world_sizes(10, 4) == []
    with pytest.raises(TrainingError, match="rank counts that keep it: 1, 2, 4, 8$"):
        check_run_config(RunConfig(batch_size=64, micro_batch_size=8), OptimConfig(), world_size=3)


def test_collectives_are_identities_in_a_lone_process():
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and gather({"a": 1}) == [{"a": 1}] and from_rank0("x") == "x"
    assert host_any(True) and not host_any(False)


@pytest.mark.parametrize("step, want", [(10, True), (15, False), (20, True), (23, True)])
def test_due_every_n_steps_and_at_the_end(step, want):
    assert due(step, 10, 23) == want


def test_a_due_checkpoint_waits_while_the_latest_steps_were_skipped_except_at_the_end():
    guard, saves, lines = NonFiniteGuard(10), SaveSchedule(every=2, total=6), []
    written = []
    for step, finite in enumerate([True, False, False, True, True, False], start=1):
        guard.observe(torch.tensor(1.0 if finite else float("nan")))
        guard.record(step, guard.arm())
        if saves.ready(step, guard, None, lines.append):
            written.append(step)
    assert written == [4, 6]  # step 2 was skipped: its save waits for step 4; step 6 is the last, saved anyway


def test_first_line_of_an_error():
    assert first_line(ValueError("one\ntwo")) == "one" and first_line(ValueError("")) == ""


# -- the metrics window ----------------------------------------------------------------------------------------------
def test_window_means_leave_out_non_finite_micro_steps():
    w = MetricsWindow(CPU)
    for loss, ok in [(2.0, 1.0), (float("nan"), 0.0), (4.0, 1.0)]:
        w.add({"loss": torch.tensor(loss), "aux": torch.tensor(loss / 2)}, torch.tensor(ok), items=8)
    r = w.read()
    assert r.means == {"": {"loss": 3.0, "aux": 1.5}} and r.steps == {"": 2.0} and r.items == {"": 24}
    assert r.seconds > 0 and r.totals == {} and r.extra == []


def test_window_groups_by_task_and_keeps_the_order_keys_were_added():
    w = MetricsWindow(CPU)
    w.add({"loss": torch.tensor(1.0)}, items=60, group="understanding")
    w.add({"loss": torch.tensor(2.0), "image_loss": torch.tensor(1.5)}, items=10, group="generation")
    w.add({"loss": torch.tensor(4.0), "image_loss": torch.tensor(2.5)}, items=30, group="generation")
    r = w.read()
    assert list(r.means) == ["understanding", "generation"]
    assert list(r.means["generation"].items()) == [("loss", 3.0), ("image_loss", 2.0)]
    assert r.means["understanding"] == {"loss": 1.0} and r.items == {"generation": 40, "understanding": 60}


def test_a_group_without_a_finite_step_means_zero():
    w = MetricsWindow(CPU)
    w.add({"loss": torch.tensor(float("inf"))}, torch.tensor(0.0))
    r = w.read()
    assert r.means == {"": {"loss": 0.0}} and r.steps == {"": 0.0}


def test_window_resets_after_each_read():
    w = MetricsWindow(CPU)
    w.add({"loss": torch.tensor(5.0)}, items=3)
    w.read()
    r = w.read()
    assert r.means == {} and r.steps == {} and r.items == {}
    w.add({"loss": torch.tensor(1.0)})
    assert w.read().means == {"": {"loss": 1.0}}


def test_extra_values_and_totals_come_back_with_the_window():
    w = MetricsWindow(CPU, across_ranks=True)  # a lone process: the sum over ranks is the window itself
    w.add({"loss": torch.tensor(1.0)})
    r = w.read(None, torch.tensor([0.0, 2.0]), torch.tensor(3.5), totals={"data/skipped": 4, "data/too_long": 1})
    assert math.isnan(r.extra[0][0]) and r.extra[1:] == [[0.0, 2.0], [3.5]]
    assert list(r.totals.items()) == [("data/skipped", 4.0), ("data/too_long", 1.0)]


def test_window_reads_back_to_the_host_once(monkeypatch):
    """Adding costs no host read; ``read`` is one transfer, whatever it carries."""
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name, **k: calls.append(_n) or _o(t, *a, **k))
    w = MetricsWindow(CPU)
    for task in ("generation", "understanding", "generation"):
        w.add({"loss": torch.tensor(1.0), "image_loss": torch.tensor(0.5)}, torch.tensor(1.0), items=4, group=task)
    assert calls == []
    w.read(torch.tensor(0.25), torch.zeros(3), totals={"data/skipped": 2})
    monkeypatch.undo()
    assert calls == ["tolist"]
