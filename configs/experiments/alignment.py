"""A probe of the base model: image and description states of the same persona, per layer.

    python -m xmem_jax.main --config=configs/experiments/alignment.py --workdir=runs/alignment

Uses the default study's cached base model (trains it if missing); see
xmem_jax/experiments/alignment.py.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config(arg)
    config.experiment = "alignment"
    return config
