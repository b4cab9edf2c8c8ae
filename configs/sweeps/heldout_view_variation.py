"""Recall and the pixel-lookup baseline against how far held-out views stray from the training
views: `data.heldout_view_variation` 0.5 (as the training views), 1, 1.5, 2, 2.5.

    python -m xmem_jax.sweep --config=configs/sweeps/heldout_view_variation.py \
        --workdir=runs/sweep_heldout_view_variation

The training views keep `data.view_variation` (0.5) and their draws, so every point shares one
base model; a point costs its dataset and its fine-tuning (test and development personas).
Columns: source and target recall on the test personas, the same on the development personas
(`dev_*`, where the default's value is chosen) and the pixel lookup of each, the accuracy of
naming a held-out view by its nearest training view in raw pixels. No unpaired control
(`--config.experiment.control=True` adds it).
"""

import ml_collections

from configs import sweeps


VARIATIONS = (0.5, 1.0, 1.5, 2.0, 2.5)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: the variations to run, comma-separated (default: all of VARIATIONS)."""
    variations = tuple(float(v) for v in arg.split(",")) if arg else VARIATIONS
    return sweeps.over_data_field("heldout_view_variation", variations, "heldout_variation",
                                  "held-out view variation (training views: 0.5)")
