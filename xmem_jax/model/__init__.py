"""Gemma 3 style vision-language model (SigLIP + Gemma 3 decoder) in Flax NNX."""

from xmem_jax.model.config import TextConfig, VisionConfig, VLMConfig, get_model_config
from xmem_jax.model.gemma import Cache
from xmem_jax.model.vlm import VLM, count_parameters

__all__ = ["VLM", "Cache", "TextConfig", "VisionConfig", "VLMConfig", "count_parameters",
           "get_model_config"]
