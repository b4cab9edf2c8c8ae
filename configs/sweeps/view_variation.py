"""Recall against how much a persona's views differ: `data.view_variation` 0.25, 0.5, 0.75, 1.

    python -m xmem_jax.sweep --config=configs/sweeps/view_variation.py \
        --workdir=runs/sweep_view_variation
    python -m xmem_jax.sweep --config=configs/sweeps/view_variation.py:0.25,0.75 \
        --workdir=runs/sweep_view_variation   # Some of the points (comma-separated).

The variation scales every spread between views of one persona (position, scale, tilt,
background, lighting, noise) about its neutral value; the draws stay the same, so the points
differ only in how far held-out views stray from the training views. It is a dataset setting:
every point generates its own dataset and trains its own base model (~8.5 min each on 2 cores;
the default study's point reuses its cache). No unpaired control
(`--config.experiment.control=True` adds it).
"""

import ml_collections

from configs import sweeps


VARIATIONS = (0.25, 0.5, 0.75, 1.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: the variations to run, comma-separated (default: all of VARIATIONS)."""
    variations = tuple(float(v) for v in arg.split(",")) if arg else VARIATIONS
    return sweeps.over_data_field("view_variation", variations, "variation",
                                  "view variation (1 = the full spread)")
