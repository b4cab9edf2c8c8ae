"""Multi-hop: names taught in one modality, a fact in text; image/description -> fact scored.

    python -m xmem_jax.main --config=configs/experiments/multihop.py --workdir=runs/multihop
    python -m xmem_jax.main --config=configs/experiments/multihop.py \
        --config.train_modality=description --workdir=runs/multihop_description

Its base model also learns the world personas' facts and the two-hop questions (so it knows the
question format); it is cached separately from the default base. On a TPU: the same with
`configs/experiments/multihop.py:gemma3_4b --config.model.checkpoint=DIR` (no base stage).
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config(arg)
    config.experiment = "multihop"
    config.control = False
    config.seeds = (0,) if arg == "quick" else (0, 1, 2)
    config.multihop = dict(fact="birth_city",
                           fact_repeat=4)  # name -> fact is 1 example a persona; images 22.
    fact = config.multihop.fact
    config.base_tasks = tuple(config.base_tasks) + (
        f"name_to_fact facts={fact} repeat=4", f"image_to_fact split=train facts={fact}",
        f"description_to_fact split=train facts={fact}")
    return config
