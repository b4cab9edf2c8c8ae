"""The paper suite on the embedded default: transfer in both directions, multi-hop,
unlearning and mitigation, then the findings table (`<workdir>/findings.md`).

    python -m xmem_jax.main --config=configs/experiments/paper.py --workdir=runs/paper
    python -m xmem_jax.main --config=configs/experiments/paper.py:quick --workdir=runs/paper_quick

Each part is the config file of the same name in configs/experiments/ (its report gives the
command that reruns it alone); they share `cache_dir`, so the dataset and the default base
model are built once (multi-hop trains its own base). The scale sweeps run separately:
`python -m xmem_jax.sweep --config=configs/sweeps/persona_counts.py --workdir=runs/paper/...`;
`findings.md` reads `runs/paper/model_size/sweep.json` if it is there.
On a TPU: `configs/experiments/paper.py:gemma3_4b --config.cache_dir=...` with each part's
`--config.parts.<part>.model.checkpoint=DIR`.
"""

import ml_collections

from configs import default
from configs.experiments import mitigation, multihop, transfer, unlearning

PARTS = {"transfer": transfer, "multihop": multihop, "unlearning": unlearning,
         "mitigation": mitigation}


def get_config(arg: str | None = None):
    config = ml_collections.ConfigDict()
    config.experiment = "paper"
    config.cache_dir = default.get_config(arg).cache_dir
    config.order = tuple(PARTS)
    config.part_files = {name: f"configs/experiments/{name}.py" + (f":{arg}" if arg else "")
                         for name in PARTS}
    config.parts = {name: module.get_config(arg) for name, module in PARTS.items()}
    for part in config.parts.values():
        part.cache_dir = config.get_ref("cache_dir")
    return config
