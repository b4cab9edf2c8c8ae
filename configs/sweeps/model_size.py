"""Recall against model size: the from-scratch presets tiny (~1.4M parameters), small (~9M) and
base (~40M) of `xmem_jax.model.config`.

    python -m xmem_jax.sweep --config=configs/sweeps/model_size.py --workdir=runs/sweep_size
    python -m xmem_jax.sweep --config=configs/sweeps/model_size.py:tiny,small \
        --workdir=runs/sweep_size   # Some of the points (comma-separated preset names).

The points share ONE dataset (the default study's; small and base read its images at 64 px,
tiny at 32) but each trains its own base model on the same steps and batches, so compute grows
with the parameters: on 2 CPU cores ~10 min (tiny, the default study's, cached), 40-50 min
(small, measured) and ~5 h (base). The optimiser settings are those tuned for tiny, and
fine-tuning freezes the first 2 decoder layers of each (of 4, 6 and 8). With them small's base
recognises held-out world views at 0.765 (tiny: 0.970; README): tune each size's base before
reading the sweep as a scaling law.
No random-init control (`--config.experiment.control=True` adds it).
"""

import ml_collections

from configs import default

MILLION_PARAMETERS = {"tiny": 1.41, "small": 9.0, "base": 40.0}  # The presets' docstrings.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: the presets to run, comma-separated (default: all of them)."""
    names = arg.split(",") if arg else list(MILLION_PARAMETERS)
    unknown = [name for name in names if name not in MILLION_PARAMETERS]
    if unknown:
        raise ValueError(f"Unknown model size(s) {', '.join(unknown)} in the config arg; known: "
                         f"{', '.join(MILLION_PARAMETERS)}")
    experiment = default.get_config()
    experiment.control = False
    config = ml_collections.ConfigDict()
    config.experiment = experiment
    config.points = tuple({"name": name, "x": MILLION_PARAMETERS[name],
                           "overrides": {"model.name": name}} for name in names)
    config.x_label = "parameters (millions)"
    config.x_log = True
    return config
