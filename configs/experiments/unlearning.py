"""Unlearning in one modality: learn both, unlearn a forget set through one, score both.

    python -m xmem_jax.main --config=configs/experiments/unlearning.py --workdir=runs/unlearning
    python -m xmem_jax.main --config=configs/experiments/unlearning.py \
        --config.unlearning.modality=description --workdir=runs/unlearning_description

Methods: gradient ascent, gradient difference, NPO and a KL-to-reference retain term
(`xmem_jax.train.losses.Objective`). Starts from the default base model (shared cache). On a
TPU: `configs/experiments/unlearning.py:gemma3_4b --config.model.checkpoint=DIR`.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config(arg)
    quick = arg == "quick"
    config.experiment = "unlearning"
    config.control = False
    config.seeds = (0,) if quick else (0, 1, 2)
    config.unlearning = dict(
        modality="image",  # Unlearned through this modality; the other is watched.
        num_forget=5 if quick else 20,  # The first study personas are forgotten.
        methods=("gradient_ascent", "gradient_difference", "npo", "kl"),
        forget_fraction=0.5,  # Of every batch; the rest are retain rows.
        num_steps=4 if quick else 60,
        # 1e-4 barely unlearns in 60 steps (forget/image 1.0 -> 0.88); 1e-3 reaches chance.
        learning_rate=1e-3,
        warmup_steps=0,
        eval_every=2 if quick else 20,
        beta=0.1,  # NPO's inverse temperature.
        retain_weight=1.0,
        # Methods are judged where they keep this fraction of the retain set's learned recall
        # in the unlearned modality (xmem_jax.experiments.unlearning.matched_retain).
        matched_retain_fraction=0.9,
        # This method also unlearns through BOTH modalities: the reference for how far the
        # other modality's recall can fall ('' for none).
        both_modalities_reference="npo")
    return config
