"""Recall against the training descriptions per persona: 2, 4, 6 and 12, on the tiny CPU default
trained on descriptions (the mirror of `views.py`, which varies the images of image-trained runs).

    python -m xmem_jax.sweep --config=configs/sweeps/descriptions.py \
        --workdir=runs/sweep_descriptions

Descriptions are a dataset setting, so every point generates its own dataset and trains its own
base model (~8 min a point on 2 cores; the 6-description point is the default study's and
reuses its base). Two descriptions a persona stay held out at every point; steps stay fixed
(base 1200, fine-tuning 300), so fewer descriptions mean more epochs over each. The source is
the descriptions, the target the held-out images. No unpaired control
(`--config.experiment.control=True` adds it).
"""

import ml_collections

from configs import default
from configs.sweeps import views


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    experiment = default.get_config()
    experiment.control = False
    experiment.train_modality = "description"
    return views.per_persona_sweep(experiment, "descriptions", (2, 4, 6, 12))
