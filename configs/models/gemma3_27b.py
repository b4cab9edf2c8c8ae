"""Gemma 3 27b (multimodal): bfloat16, LoRA rank 16 on the decoder projections.

    python -m xmem_jax.main --config=configs/default.py:gemma3_27b --config.model.checkpoint=DIR \
        --workdir=runs/gemma3_27b

DIR: a local Hugging Face download of google/gemma-3-27b-it (config.json, safetensors,
tokenizer). Full fine-tuning: --config.model.lora.rank=0.
"""

from configs import models


def get_config(arg=None):
    del arg
    return models.get_config("gemma3_27b")
