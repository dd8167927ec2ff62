"""What the tokenizer and MLLM trainers share (``vqrae.train``, ``mllm.train``): everything around their loops.

It lives inside ``vqrae`` because ``vqrae`` is the base package: ``mllm`` already depends on it (``mllm -> vqrae`` is
the only edge between the two), and the runtime itself needs only torch and DeepSpeed, never a model. A package
beside both would add a third top-level name for no new edge. ``import vqrae`` does not load it; DeepSpeed is
imported only by the functions that call it.

One file per concern, in dependency order (each imports only the ones before it):
``config`` (RunConfig, OptimConfig, TrainingError, the DeepSpeed config) · ``distributed`` (process group,
collectives) · ``log`` (RunLogger, MetricsWindow) · ``precision`` (autocast) · ``optim`` (parameter groups,
GuardedAdamW, schedules, EMA) · ``guard`` (NonFiniteGuard) · ``safe_load`` · ``checkpoint`` (Checkpointer, RNG
state, save_checkpoint) · ``lock`` (one run per output folder) · ``elastic`` (pre-emption, another number of
ranks) · ``session`` (session, restore, load_engine, finish).

Nothing is re-exported here: callers import from the concern's module (``from vqrae.runtime.checkpoint import
Checkpointer``), so a reader follows the import to the file that defines the name, and importing one concern
does not load the others (``vqrae.runtime.config`` needs neither the lock nor the checkpoints).
"""
