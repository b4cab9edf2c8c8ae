"""Recall against the training views per persona: 4, 8, 14 and 22, on the tiny CPU default.

    python -m xmem_jax.sweep --config=configs/sweeps/views.py --workdir=runs/sweep_views

Views are a dataset setting, so every point generates its own dataset and trains its own base
model (~7.5 min each on 2 cores; the 22-view point is the default study's and reuses its cache).
Two views a persona stay held out at every point; steps stay fixed (base 1200, fine-tuning
300), so fewer views mean more epochs over each. No random-init control
(`--config.experiment.control=True` adds it).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    experiment = default.get_config()
    experiment.control = False
    heldout = experiment.data.num_heldout_views
    config = ml_collections.ConfigDict()
    config.experiment = experiment
    config.points = tuple(
        {"name": f"views_{train_views}", "x": float(train_views),
         "overrides": {"data.num_views": train_views + heldout}}
        for train_views in (4, 8, 14, 22))
    config.x_label = "training views per persona"
    config.x_log = False
    return config
