"""Sweep configs: `python -m xmem_jax.sweep --config=configs/sweeps/NAME.py[:ARG]`."""

import ml_collections

from configs import default


def over_data_field(field: str, values, name: str, x_label: str) -> ml_collections.ConfigDict:
    """A sweep of the default study (no control) over one `data.<field>`, a point per value."""
    experiment = default.get_config()
    experiment.control = False
    config = ml_collections.ConfigDict()
    config.experiment = experiment
    config.points = tuple({"name": f"{name}_{value}", "x": value,
                           "overrides": {f"data.{field}": value}} for value in values)
    config.x_label = x_label
    config.x_log = False
    return config
