"""Recall against the training views per persona: 4, 8, 14 and 22, on the tiny CPU default.

    python -m xmem_jax.sweep --config=configs/sweeps/views.py --workdir=runs/sweep_views

Views are a dataset setting, so every point generates its own dataset and trains its own base
model (~7.5 min each on 2 cores; the 22-view point is the default study's and reuses its cache).
Two views a persona stay held out at every point; steps stay fixed (base 1200, fine-tuning
300), so fewer views mean more epochs over each. No unpaired control
(`--config.experiment.control=True` adds it).
"""

import ml_collections

from configs import default


def per_persona_sweep(experiment: ml_collections.ConfigDict, kind: str,
                      train_counts: tuple[int, ...]) -> ml_collections.ConfigDict:
    """A sweep over the training `kind` ("views" or "descriptions") per persona: each point sets
    `data.num_<kind>` to its count plus the held-out ones, which stay as `experiment` has them."""
    heldout = experiment.data[f"num_heldout_{kind}"]
    config = ml_collections.ConfigDict()
    config.experiment = experiment
    config.points = tuple(
        {"name": f"{kind}_{count}", "x": float(count),
         "overrides": {f"data.num_{kind}": count + heldout}}
        for count in train_counts)
    config.x_label = f"training {kind} per persona"
    config.x_log = False
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    experiment = default.get_config()
    experiment.control = False
    return per_persona_sweep(experiment, "views", (4, 8, 14, 22))
