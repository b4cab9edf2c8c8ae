"""Model sections of experiment configs: `get_config(name)` for a preset of
`xmem_jax.model.config`, e.g. `configs/default.py:gemma3_4b`.

A section holds the preset `name`, an optional Hugging Face `checkpoint` directory (its
config.json then defines the architecture and its weights replace the base model), the compute
and parameter `dtype`, `remat` (the `VLMConfig.remat` policy: what each layer keeps for the
backward pass, recomputing the rest), `attention` (the `VLMConfig.attention` kernel: 'auto'
picks splash on TPU, cuDNN on GPU, XLA's einsum elsewhere) and `lora` (rank 0 = full
fine-tuning).
"""

import ml_collections

from xmem_jax.model import lora

# Real Gemma 3 sizes: bfloat16, LoRA on the decoder's projections, frozen vision tower.
GEMMA3 = ("gemma3_1b", "gemma3_4b", "gemma3_12b", "gemma3_27b")
# Each size's remat policy at its fine-tuning shapes (`python -m xmem_jax.compile`): 4B full
# fine-tuning on v5p:2x2x2 keeps the weight matmuls ('dots') at 10% of HBM, XLA's FLOPs 1.02x
# the useful count against 1.21x recomputing everything ('full'; docs/benchmarks.md, the lean
# step). The larger sizes recompute everything until measured.
REMAT = {"gemma3_1b": "dots", "gemma3_4b": "dots", "gemma3_12b": "full", "gemma3_27b": "full"}


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = name
    config.checkpoint = ""
    config.dtype = "bfloat16" if name in GEMMA3 else "float32"
    config.remat = REMAT.get(name, "none")
    config.attention = "auto"
    config.lora = lora.default_config()
    if name in GEMMA3:
        config.lora.rank = 16
        config.lora.alpha = 32.0
    return config
