"""Train a VQRAE tokenizer with DeepSpeed.

    deepspeed scripts/train_tokenizer.py --config configs/tokenizer/demo_stage1.yaml [key.sub=value ...]
    deepspeed --num_gpus 8 scripts/train_tokenizer.py --config configs/tokenizer/siglip2_so400m_stage1.yaml
    deepspeed scripts/train_tokenizer.py --config ... --resume auto      # continue the newest checkpoint

Stage 1 trains projections, W and the decoder on a frozen encoder; stage 2 (``stage=2``, ``init_from`` a stage-1
export) also trains the encoder with self-distillation. The final EMA model is exported to ``<output_dir>/model``.
The loop is ``vqrae.train.train``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqrae import train  # noqa: E402
from vqrae import cli  # noqa: E402

main = cli.train_command(train.TokenizerTrainConfig, train.train, __doc__, "configs/tokenizer/demo_stage1.yaml")

if __name__ == "__main__":
    sys.exit(cli.main(main))
