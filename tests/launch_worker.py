"""Several training runs in one ``deepspeed`` launch: the tests that train on 2 ranks pay for the launcher, the
imports and the process group once (seconds of CPU each time) instead of once per run.

    deepspeed --num_gpus N tests/launch_worker.py PLAN.json

``PLAN.json`` lists runs (``kind``: tokenizer or mllm, ``config``, ``overrides``, ``resume``, ``stop_after``,
``record``); they run one after the other in this launch's process group, each through the trainers' own
``train`` (what the scripts call). ``stop_after`` stops a run after that many optimizer steps of this launch through
the pre-emption path (the agreed-stop check says yes there, as after a SIGTERM), so it writes its checkpoint and
raises ``Preempted``. Each rank writes the run's outcome and the source rows it trained on to
``<record>_rank<r>.json`` (tokenizer: per micro-batch; unified model: per task, in order), and for the unified model
the parameter elements this rank held when the engine got the model, and in all. ``whole_llm`` builds the LLM whole
on every rank instead of partitioned under ZeRO-3.
"""
from __future__ import annotations

import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

import deepspeed  # noqa: E402

import mllm  # noqa: E402
import mllm.data  # noqa: E402
import mllm.train  # noqa: E402
import vqrae.data  # noqa: E402
import vqrae.runtime.elastic  # noqa: E402
import vqrae.train  # noqa: E402
from vqrae.config import load_config  # noqa: E402

RECORD: dict = {}


class RecordingLoader:
    """A tokenizer DataLoader whose consumed batches' source rows are recorded."""

    def __init__(self, loader, rows: list):
        self.loader, self.rows = loader, rows

    def __iter__(self):
        for batch in self.loader:
            self.rows.append(batch.index.tolist())
            yield batch

    def __len__(self):
        return len(self.loader)


def recording_build_dataloader(*args, **kwargs):
    loader, sampler = vqrae.data.build_dataloader(*args, **kwargs)
    rows: list = []
    RECORD.setdefault("loaders", []).append(rows)  # calibration's loader first, the training loader last
    return RecordingLoader(loader, rows), sampler


real_getitem = mllm.data._Keyed.__getitem__


def recording_getitem(self, key):
    # with num_workers 0 the loader fetches each micro-batch when the trainer asks for it: fetched = trained on
    RECORD.setdefault(RECORD["tasks"][id(self)], []).append(key.index)
    return real_getitem(self, key)


real_make_loaders = mllm.train.make_loaders


def recording_make_loaders(*args, **kwargs):
    loaders = real_make_loaders(*args, **kwargs)
    RECORD["tasks"] = {id(loader.loader.dataset): task for task, loader in loaders.items()}
    return loaders


real_initialize = deepspeed.initialize


def recording_initialize(*args, model=None, **kwargs):
    """The parameter elements the model holds on this rank when the engine gets it, and in all."""
    if isinstance(model, mllm.UnifiedModel):
        params = list(model.parameters())
        RECORD["elements"] = [sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
                              sum(getattr(p, "ds_numel", p.numel()) for p in params)]
    return real_initialize(*args, model=model, **kwargs)


def stop_after(steps: int):
    calls = {"n": 0}

    def agreed(self) -> bool:
        calls["n"] += 1  # called once per optimizer step, on every rank alike
        return calls["n"] == steps

    return agreed


def main(plan_path: str) -> None:
    # The imports' objects stay for the whole launch: out of the collector's sight, DeepSpeed's gc.collect() at each
    # ZeRO-3 engine's set-up walks only what the runs create (0.4 s less each time).
    gc.freeze()
    with open(plan_path) as f:
        plan = json.load(f)
    vqrae.train.build_dataloader = recording_build_dataloader
    mllm.data._Keyed.__getitem__ = recording_getitem
    mllm.train.make_loaders = recording_make_loaders
    real_agreed = vqrae.runtime.elastic.StopSignals.agreed
    real_build = mllm.train.build_model
    deepspeed.initialize = recording_initialize
    for run in plan:
        RECORD.clear()
        vqrae.runtime.elastic.StopSignals.agreed = stop_after(run["stop_after"]) if run.get("stop_after") else real_agreed
        # whole_llm: the LLM built whole on every rank (no DeepSpeed config at construction), the engine partitions it
        mllm.train.build_model = (lambda cfg, ds_cfg=None: real_build(cfg)) if run.get("whole_llm") else real_build
        module = vqrae.train if run["kind"] == "tokenizer" else mllm.train
        schema = vqrae.train.TokenizerTrainConfig if run["kind"] == "tokenizer" else mllm.train.MLLMTrainConfig
        outcome = "done"
        try:
            module.train(load_config(schema, run["config"], run["overrides"]), run.get("resume"))
        except vqrae.runtime.elastic.Preempted as e:
            outcome = f"preempted at {e.step}"
        except Exception as e:  # the test reads it; the next run goes on
            outcome = f"error: {type(e).__name__}: {e}"
        rank = dist.get_rank() if dist.is_initialized() else 0
        rows = RECORD["loaders"][-1] if run["kind"] == "tokenizer" else {t: RECORD.get(t, []) for t in ("generation", "understanding")}
        with open(f"{run['record']}_rank{rank}.json", "w") as f:
            json.dump({"outcome": outcome, "rows": rows, "elements": RECORD.get("elements")}, f)
        if dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local")]
    main(args[0])
