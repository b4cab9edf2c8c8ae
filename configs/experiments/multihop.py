"""Multi-hop: names taught in one modality, a fact in text; image/description -> fact scored.

    python -m xmem_jax.main --config=configs/experiments/multihop.py --workdir=runs/multihop
    python -m xmem_jax.main --config=configs/experiments/multihop.py \
        --config.train_modality=description --workdir=runs/multihop_description

Its base model also learns the world personas' facts and the two-hop questions (so it knows the
question format), but no two-hop question of the last `multihop.withheld_world_personas` world
personas (scored on the base: does it compose?); it is cached separately from the default base.
`--config.multihop.answer_with_name=True` answers two-hop questions "{name}. {value}". On a
TPU: the same with `configs/experiments/multihop.py:gemma3_4b --config.model.checkpoint=DIR`
(no base stage, so no composition in the base).
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config(arg)
    config.experiment = "multihop"
    config.control = False
    config.seeds = (0,) if arg == "quick" else (0, 1, 2)
    config.multihop = dict(
        fact="birth_city",
        fact_repeat=4,  # name -> fact is 1 example a persona; images 22.
        # World personas whose two-hop questions the base never learns, scored on the base
        # (composition_in_base). 50 of 300: 100 held-out views and 100 descriptions, a choice
        # accuracy's standard error <= 0.05, against a most-common-city baseline ~0.08 at that
        # count; 250 personas still teach the base the question format.
        withheld_world_personas=10 if arg == "quick" else 50,
        # Two-hop answers "{name}. {value}", the value scored after the generated name.
        answer_with_name=False)
    fact = config.multihop.fact
    # The two-hop questions of the world personas not withheld are added by the experiment
    # (xmem_jax.experiments.multihop.with_base_two_hop), which knows the withheld range.
    config.base_tasks = tuple(config.base_tasks) + (f"name_to_fact facts={fact} repeat=4",)
    return config
