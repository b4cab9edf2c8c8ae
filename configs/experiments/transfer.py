"""Transfer in both directions: fine-tune on images, then on descriptions; score both.

    python -m xmem_jax.main --config=configs/experiments/transfer.py --workdir=runs/transfer

Each direction is the default study (`configs/default.py`) in its own subdirectory, with three
fine-tuning seeds (mean ± std) from the one cached base model and the unpaired-base control. On
a TPU: `configs/experiments/transfer.py:gemma3_4b --config.model.checkpoint=DIR`.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config(arg)
    config.experiment = "directions"
    config.directions = ("image", "description")
    config.seeds = (0,) if arg == "quick" else (0, 1, 2)
    return config
