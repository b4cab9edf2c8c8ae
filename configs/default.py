"""The embedded default study: a tiny VLM on procedural personas, on a laptop CPU.

    python -m xmem_jax.main --config=configs/default.py --workdir=runs/default
    python -m xmem_jax.main --config=configs/default.py:quick --workdir=runs/quick   # < 1 min

Overrides, e.g. `--config.train_modality=description` or `--config.finetune.num_steps=600`.

Steps: (1) generate the persona dataset, or reuse it; (2) build the *base* VLM, or reuse it from
the cache: it learns image -> name and description -> name for the disjoint "world" personas,
standing in for VLM pre-training (it is what links pictures and words); (3) fine-tune the base
on the "study" personas in ONE modality; (4) score held-out recall in both modalities during
fine-tuning; (5) write results.json, report.md and curves.png. The control repeats (3)-(4)
from a random initialisation, without the base.
"""

import ml_collections

from configs.data import procedural
from xmem_jax.train import trainer


def _train_config(num_steps, batch_size, learning_rate, warmup_steps):
    config = trainer.default_config()
    config.num_steps = num_steps
    config.batch_size = batch_size
    config.log_every = 20
    config.optim.learning_rate = learning_rate
    config.optim.warmup_steps = warmup_steps
    config.checkpoint.every_steps = 200
    config.checkpoint.max_to_keep = 2
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    quick = arg == "quick"
    if arg not in (None, "", "quick"):
        raise ValueError(f"Unknown config arg {arg!r}; known: quick")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.train_modality = "image"  # "image" | "description": the fine-tuning modality.
    config.cache_dir = "runs/cache"  # Datasets and base models, keyed by their configs.
    config.control = True  # Also fine-tune a randomly initialised model (no base).

    config.data = procedural.get_config()
    config.data.num_personas = 600
    config.world_personas = (0, 500)  # Seen by the base model only.
    config.study_personas = (500, 600)  # Fine-tuned on and scored; never seen by the base.

    config.model = "tiny"  # A preset of xmem_jax.model.config.
    config.max_length = 88  # Tokens per example (prompt + answer); descriptions need ~80.

    # Sized by a FLOP budget: ~6 x 1.4M params x 2.8M tokens ~ 24 TFLOP, ~6 min on 2 cores.
    config.base = _train_config(num_steps=1000, batch_size=32, learning_rate=3e-3,
                                warmup_steps=50)
    # What the base learns about the world personas (task strings of xmem_jax.data.tasks).
    config.base_tasks = ("image_to_name split=train", "description_to_name split=train")

    config.finetune = _train_config(num_steps=300, batch_size=32, learning_rate=1e-3,
                                    warmup_steps=20)
    config.finetune.optim.freeze_regex = ""
    config.eval_every = 50
    config.eval_batch_size = 64

    if quick:
        config.data.num_personas = 60
        config.data.num_views = 4
        config.data.num_heldout_views = 1
        config.data.num_descriptions = 4
        config.data.num_heldout_descriptions = 1
        config.world_personas = (0, 40)
        config.study_personas = (40, 60)
        config.base.num_steps = 40
        config.base.batch_size = 16
        config.base.optim.warmup_steps = 5
        config.finetune.num_steps = 20
        config.finetune.batch_size = 16
        config.finetune.optim.warmup_steps = 2
        config.eval_every = 10
        config.eval_batch_size = 32
    return config
