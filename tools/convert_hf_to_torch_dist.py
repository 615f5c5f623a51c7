#!/usr/bin/env python
"""Convert HuggingFace safetensors <-> Megatron torch_dist checkpoints: ``opd-train convert``, slime's script name.

    python tools/convert_hf_to_torch_dist.py [MODEL_ARGS] --hf-checkpoint /models/Qwen3-8B --save /ckpt/Qwen3-8B_dist
    python tools/convert_hf_to_torch_dist.py --load /ckpt/run --ckpt-step 20 --hf-save /models/run-step20

slime's Megatron model flags (``${MODEL_ARGS[@]}``) are accepted and checked against the HF config, which is what
the architecture is read from. Needs the installed package (``bash tools/install.sh``).
"""
import sys

from opd_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
