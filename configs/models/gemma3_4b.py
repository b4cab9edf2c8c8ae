"""Gemma 3 4b (multimodal): bfloat16, LoRA rank 16 on the decoder projections.

    python -m xmem_jax.main --config=configs/default.py:gemma3_4b --config.model.checkpoint=DIR \
        --workdir=runs/gemma3_4b

DIR: a local Hugging Face download of google/gemma-3-4b-it (config.json, safetensors,
tokenizer). Full fine-tuning: --config.model.lora.rank=0.
"""

from configs import models


def get_config(arg=None):
    del arg
    return models.get_config("gemma3_4b")
