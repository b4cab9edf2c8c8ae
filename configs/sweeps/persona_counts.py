"""Recall against the number of study personas: 10^2, 10^3 and 10^4 on the tiny CPU default.

    python -m xmem_jax.sweep --config=configs/sweeps/persona_counts.py --workdir=runs/sweep_personas
    python -m xmem_jax.sweep --config=configs/sweeps/persona_counts.py --workdir=runs/sweep_personas \
        --point=1  # One point (0: 10^2, 1: 10^3, 2: 10^4); --aggregate tables the finished ones.
    python -m xmem_jax.sweep --config=configs/sweeps/persona_counts.py:quick \
        --workdir=runs/sweep_quick  # 2 points, a few minutes

All points share ONE dataset (10,600 personas) and ONE base model (trained on the default
study's world personas, built once; not the default study's own base, whose dataset has 700
personas). Point n fine-tunes on test personas 600 to 600 + n for 3n steps (300 at n = 100, as
the default study), so every persona gets as many fine-tuning examples (~4 epochs of its 22
training views) at every count: the training budget grows linearly with n, 30,000 steps at
10^4. Recall is scored ~6 times a run with the default scoring (an exact rank over at most 256
sampled queries a task, so an evaluation's cost grows linearly with n: benchmarks/scoring.py);
each point also repeats the default's development run (personas 500-599). Chance accuracy is
1/n. No unpaired control (`--config.experiment.control=True` adds it).

On a TPU, 10^3 to 10^4 personas with a pretrained Gemma 3 (LoRA, no base stage; the preset of
`configs/default.py:gemma3_4b`, fine-tuning batch 64, the same examples per persona as its own
study, recall scored before and after):

    python -m xmem_jax.sweep --config=configs/sweeps/persona_counts.py:gemma3_4b \
        --config.experiment.model.checkpoint=/path/to/gemma-3-4b-it --workdir=runs/sweep_4b

Other counts: edit `counts` below (data.num_personas follows).
"""

import ml_collections

from configs import default, models


def persona_points(counts, start: int, examples_per_persona: float, batch_size: int,
                   num_evals: int) -> tuple:
    """Study personas [start, start + n) for each count n, trained for the same examples per
    persona, and scored `num_evals` times after the start."""
    points = []
    for count in counts:
        steps = max(1, round(examples_per_persona * count / batch_size))
        points.append({"name": f"personas_{count}", "x": float(count), "overrides": {
            "study_personas": (start, start + count),
            "finetune.num_steps": steps,
            "eval_every": max(1, steps // num_evals)}})
    return tuple(points)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: '' (tiny, CPU), 'quick' (2 small points, for tests) or a Gemma 3 preset."""
    experiment = default.get_config(arg)
    study = experiment.study_personas
    examples_per_persona = (experiment.finetune.num_steps * experiment.finetune.batch_size
                            / (study[1] - study[0]))
    start = study[0]  # The test personas' start: clear of the world and development ones.
    if arg == "quick":
        counts, num_evals = (10, 20), 2
    elif arg in models.GEMMA3:
        counts, num_evals = (1_000, 3_000, 10_000), 1
        experiment.finetune.batch_size = 64
    else:
        counts, num_evals = (100, 1_000, 10_000), 6
    experiment.data.num_personas = start + max(counts)  # One dataset for every point.
    experiment.control = False

    config = ml_collections.ConfigDict()
    config.experiment = experiment
    config.points = persona_points(counts, start, examples_per_persona,
                                   experiment.finetune.batch_size, num_evals)
    config.x_label = "study personas"
    config.x_log = True
    return config
