"""Run lmms-eval tasks (MME, POPE, SEED-Bench, ... and the tasks in eval_tasks/) on a saved unified model.

    python scripts/eval_mllm.py --model outputs/demo/mllm/model --tasks demo_shapes --output outputs/eval
    python scripts/eval_mllm.py --model owner/name --tasks mme,pope --limit 100 --batch-size 8 --device cuda

Writes lmms-eval's usual results JSON (``<output>/<model>/<date>_results.json``, with ``--log-samples`` the
per-question answers beside it) and prints its table. Needs the ``eval`` extra (``pip install -e ".[eval]"``).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqrae.cli import Parser, check_model_arg, main as cli_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(ROOT, "eval_tasks")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="unified model directory or hub id")
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval task or group names")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction below 1); for testing")
    p.add_argument("--output", default="outputs/eval", help="folder for the results JSON")
    p.add_argument("--batch-size", type=int, default=1, help="questions answered together")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="LLM weights: float32, bfloat16 or float16")
    p.add_argument("--include-path", action="append", default=[], help="another folder of task YAMLs (repeatable)")
    p.add_argument("--log-samples", action="store_true", help="also write every question with its answer")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(argv=None) -> dict:
    args = parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be > 0, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_model_arg(args.model, default="")  # before lmms-eval indexes its tasks (seconds)
    try:
        from lmms_eval import evaluator
        from lmms_eval.loggers import EvaluationTracker
        from lmms_eval.tasks import TaskManager
        from lmms_eval.utils import make_table
    except ImportError:
        raise ValueError("lmms-eval is not installed; pip install -e \".[eval]\"") from None
    from mllm.lmms import MODEL_ID, VQRAELmms

    for folder in args.include_path:
        if not os.path.isdir(folder):
            raise ValueError(f"--include-path {folder} is not a folder of task YAMLs")
    # lmms-eval keeps the first definition of a name: the user's folders before this project's eval_tasks/
    manager = TaskManager("WARNING", include_path=[*args.include_path, TASKS_DIR], model_name=MODEL_ID)
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    missing = [t for t in wanted if t not in manager.match_tasks([t])]
    if not wanted or missing:
        raise ValueError(f"unknown lmms-eval task {', '.join(missing) or repr(args.tasks)}; "
                         f"`lmms-eval --tasks list` lists them, eval_tasks/ holds this project's, --include-path adds a folder")
    model = VQRAELmms(args.model, device=args.device, batch_size=args.batch_size, dtype=args.dtype)
    tracker = EvaluationTracker(output_path=args.output)
    model_args = f"pretrained={args.model}"
    results = evaluator.simple_evaluate(
        model=model, model_args=model_args, tasks=wanted, batch_size=args.batch_size, limit=args.limit,
        log_samples=args.log_samples, evaluation_tracker=tracker, task_manager=manager, verbosity="WARNING",
        random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed,
    )
    results["config"]["model"] = MODEL_ID
    samples = results.pop("samples", None)
    tracker.general_config_tracker.log_experiment_args(
        model_source=MODEL_ID, model_args=model_args, system_instruction=None, chat_template=None,
        fewshot_as_multiturn=False,
    )
    tracker.save_results_aggregated(results=results, samples=samples if args.log_samples else None,
                                    datetime_str=results["date"])
    if args.log_samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(make_table(results))
    print(f"results written under {os.path.join(args.output, tracker.general_config_tracker.model_name_sanitized)}")
    return results


def main(argv=None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
