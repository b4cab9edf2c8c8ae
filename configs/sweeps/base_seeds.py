"""Recall against the base model's seed: how much one base training moves the study's figures.

    python -m xmem_jax.sweep --config=configs/sweeps/base_seeds.py --workdir=runs/sweep_seeds
    python -m xmem_jax.sweep --config=configs/sweeps/base_seeds.py \
        --config.experiment.train_modality=description --workdir=runs/sweep_seeds_description

`seed` sets the base model's initialisation and data order; each point trains its own base
(~7 min on 2 cores) and fine-tunes it once (fine-tuning seed 0). `config.seeds` (fine-tuning
seeds from ONE base) only reorders fine-tuning data and barely moves recall (docs/results.md),
so this sweep is the one that says how far a single run's figures can be trusted. sweep.md ends
with the mean and standard deviation over the points. No unpaired control
(`--config.experiment.control=True` adds it). `configs/sweeps/base_seeds.py:3` runs seeds 0-2.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: the number of seeds, from 0 (default 5)."""
    num_seeds = int(arg) if arg else 5
    if num_seeds < 2:
        raise ValueError(f"A seed sweep needs at least 2 seeds; the config arg gave {arg!r}")
    experiment = default.get_config()
    experiment.control = False
    config = ml_collections.ConfigDict()
    config.experiment = experiment
    config.points = tuple({"name": f"seed_{seed}", "x": float(seed), "overrides": {"seed": seed}}
                          for seed in range(num_seeds))
    config.x_label = "base model seed"
    config.x_log = False
    config.aggregate = True  # sweep.md gains the mean and std over the points.
    return config
