"""Train the unified multimodal model (LLM + frozen VQRAE + projector) with DeepSpeed.

    deepspeed scripts/train_mllm.py --config configs/mllm/tiny.yaml [key.sub=value ...]
    deepspeed --num_gpus 8 scripts/train_mllm.py --config configs/mllm/qwen3_0p6b_generation.yaml
    deepspeed scripts/train_mllm.py --config ... --resume auto      # continue the newest checkpoint

Each micro-batch trains one task, generation (caption -> image codes) or understanding (image + question ->
answer), on a seeded schedule at ``data.task_ratio`` that all ranks share. Stages chain through ``init_from``:
projector alignment (``model.freeze_llm``), then full or LoRA fine-tuning from its export. The final model is
exported to ``<output_dir>/model`` (``UnifiedModel.from_pretrained``). The loop is ``mllm.train.train``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mllm import train  # noqa: E402
from vqrae import cli  # noqa: E402

main = cli.train_command(train.MLLMTrainConfig, train.train, __doc__, "configs/mllm/demo.yaml")

if __name__ == "__main__":
    sys.exit(cli.main(main))
