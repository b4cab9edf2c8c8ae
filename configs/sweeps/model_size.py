"""Recall against model size: the from-scratch presets tiny (1.41M parameters), small (9.46M) and
base (42.9M) of `xmem_jax.model.config`; the plot's x is each preset's counted parameters.

    python -m xmem_jax.sweep --config=configs/sweeps/model_size.py --workdir=runs/sweep_size
    python -m xmem_jax.sweep --config=configs/sweeps/model_size.py:tiny,small \
        --workdir=runs/sweep_size   # Some of the points (comma-separated preset names).

The points share ONE dataset (the default study's; small and base read its images at 64 px,
tiny at 32) but each trains its own base model on the same steps and batches, so compute grows
with the parameters: on 2 CPU cores ~10 min (tiny, the default study's, cached), ~40 min
(small) and ~1.6 h (base), measured alone (docs/results.md). Fine-tuning freezes the first 2
decoder layers of each (of 4, 6 and 8). No unpaired control (`--config.experiment.control=True`
adds it).

Learning rates: tiny's tuned rates (base 3e-3, fine-tuning 2e-3) times 128 / the decoder width,
so 1/2 for small and 1/4 for base: Adam's update size does not shrink with width, so wider
layers need smaller rates to move their outputs as much (the rule of muP and of the GPT-3 size
table). Chosen before measuring, not tuned. Measured (docs/results.md): with tiny's rates
small's base underfitted (final training loss 0.17 against tiny's 0.02) and recognised held-out
world views at 0.765; with their own rates small's and base's reach 0.022 and 0.030 and
recognise them at 0.985 and 0.965 (tiny: 0.970), and the three sizes recall the source at
0.98-0.99.
"""

import ml_collections
from flax import nnx

from configs import default
from xmem_jax.model import VLM, count_parameters
from xmem_jax.model import config as model_config

SIZES = ("tiny", "small", "base")
REFERENCE_WIDTH = model_config.get_model_config("tiny").text.embed_dim  # Rates tuned for it.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: the presets to run, comma-separated (default: all of them)."""
    names = arg.split(",") if arg else list(SIZES)
    unknown = [name for name in names if name not in SIZES]
    if unknown:
        raise ValueError(f"Unknown model size(s) {', '.join(unknown)} in the config arg; known: "
                         f"{', '.join(SIZES)}")
    experiment = default.get_config()
    experiment.control = False
    config = ml_collections.ConfigDict()
    config.experiment = experiment
    points = []
    for name in names:
        preset = model_config.get_model_config(name)
        scale = REFERENCE_WIDTH / preset.text.embed_dim
        parameters = count_parameters(nnx.eval_shape(lambda: VLM(preset, rngs=nnx.Rngs(0))))
        points.append({"name": name, "x": round(parameters / 1e6, 2), "overrides": {
            "model.name": name,
            "base.optim.learning_rate": experiment.base.optim.learning_rate * scale,
            "finetune.optim.learning_rate": experiment.finetune.optim.learning_rate * scale}})
    config.points = tuple(points)
    config.x_label = "parameters (millions)"
    config.x_log = True
    return config
