"""The embedded default study: a tiny VLM on procedural personas, on a laptop CPU.

    python -m xmem_jax.main --config=configs/default.py --workdir=runs/default
    python -m xmem_jax.main --config=configs/default.py:quick --workdir=runs/quick   # < 1 min
    python -m xmem_jax.main --config=configs/default.py:gemma3_4b \
        --config.model.checkpoint=/path/to/gemma-3-4b-it --workdir=runs/gemma3_4b  # TPU/GPU

Overrides, e.g. `--config.train_modality=description` or `--config.finetune.num_steps=600`.

Steps: (1) generate the persona dataset, or reuse it; (2) build the *base* VLM, or reuse it from
the cache: it learns image -> name and description -> name for the disjoint "world" personas,
standing in for VLM pre-training (it is what links pictures and words); (3) fine-tune the base
on the "study" personas in ONE modality; (4) score held-out recall in both modalities during
fine-tuning; (5) write results.json, report.md and curves.png. (3)-(4) run on the test personas
(`study_personas`, the headline) and on the development personas (`dev_personas`, where settings
are chosen). The control repeats (3)-(4) on the test personas from the *unpaired* base: the same
steps and data volume, but each world persona seen in one modality only.
"""

import ml_collections

from configs import models
from configs.data import procedural
from xmem_jax.train import trainer


# Visual attributes that vary between personas (the others keep one value for everybody).
VISIBLE_ATTRIBUTES = ("skin_tone", "hair_colour", "hair_style", "eyewear", "facial_hair",
                      "headwear", "clothing_colour", "clothing_style")


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
    """arg: '' (the tiny default), 'quick', or a model preset ('gemma3_4b', ...)."""
    quick = arg == "quick"
    pretrained = arg in models.GEMMA3
    if arg not in (None, "", "quick") and not pretrained:
        raise ValueError(f"Unknown config arg {arg!r}; known: quick, {', '.join(models.GEMMA3)}")
    config = ml_collections.ConfigDict()
    config.experiment = "transfer"  # See xmem_jax/experiments/__init__.py.
    config.seed = 0  # The base model (its init and data order).
    config.seeds = (0,)  # Fine-tuning runs (data order): mean and std.
    config.train_modality = "image"  # "image" | "description": the fine-tuning modality.
    config.cache_dir = "runs/cache"  # Datasets and base models, keyed by their configs.
    # Also fine-tune from the unpaired base (world images teach names for one half of the
    # world personas, world descriptions for the other): if transfer needs personas seen in both
    # modalities in pre-training, its target stays near chance. A second base: ~7 min cold.
    config.control = True

    config.data = procedural.get_config()
    config.data.num_personas = 700
    # 22 training views per persona (2 more held out): with 6, the vision tower memorises views
    # (held-out image recall 0.57 vs 0.67 with 22, from scratch on 100 personas; patch 4 then
    # 0.86). The views sweep (image-trained source / target): 8 views 0.970 / 0.060, 14 views
    # 0.975 / 0.115, 22 views 0.980 / 0.200 (docs/results.md, views per persona).
    config.data.num_views = 24
    # Only attributes a 32 px view shows: a description that also names eye colour, age, gender
    # presentation or a small accessory identifies personas by what no image carries, and the
    # base then keys the two modalities on different features. Measured (image-trained, 300
    # world personas): all 12 attributes: source 0.870, target 0.040 (rank 35.0); these 8:
    # source 0.905, target 0.100 (rank 25.8). See docs/history.md.
    config.data.attributes = ",".join(VISIBLE_ATTRIBUTES)
    # Views of one persona differ half as much as the generator's full spread (position, scale,
    # tilt, background, lighting, noise): images the tiny vision tower can learn quickly.
    # Over five base seeds, image-trained source / target, description-trained source / target:
    # full spread 0.885 / 0.114, 0.992 / 0.107; half 0.976 / 0.159, 0.995 / 0.103 (docs/history.md).
    config.data.view_variation = 0.5
    # Widened together with the held-out views (configs/sweeps/view_variation.py:1.0,2.0), the
    # model beats a pixel lookup only past the full spread (at 2: source 0.450, lookup 0.245),
    # where the target falls (0.110 against 0.200): 0.5 keeps the transfer largest, and the
    # image-source figure is read beside the lookup (docs/results.md).
    # Held-out views are drawn like the training views (`heldout_view_variation` unset), so a
    # pixel lookup of the training views names them as well as the model (test: 0.995 against
    # source 0.980). Drawn wider, the lookup fails, but the model faster: at 2.0, source 0.285
    # against the lookup's 0.425 (docs/results/study/heldout_view_variation_*.json,
    # docs/results.md).
    # Seen by the base model only. More world personas, more transfer but a weaker base in the
    # same steps (image-trained source / target, description-trained target; docs/history.md).
    # With 22 views, the full view spread and fine-tuning rate 2e-3: 300: 0.885 / 0.135, 0.105;
    # 400: 0.790 / 0.200, 0.140.
    # 300 is the only setting tried with every target >= 10x chance and the source near 0.9.
    config.world_personas = (0, 300)
    # Fine-tuned on and scored; never seen by the base. Test personas (600-699, added on
    # 2026-12-01), never used to choose a setting: the headline. Development personas
    # (500-599, the study personas every setting before was chosen on): for choosing.
    config.study_personas = (600, 700)
    config.dev_personas = (500, 600)
    config.base_eval_personas = (0, 100)  # World personas whose held-out recall checks the base.

    # A preset of xmem_jax.model.config, or a Hugging Face checkpoint (see configs/models).
    config.model = models.get_config(arg if pretrained else "tiny")
    config.max_length = 88  # Tokens per example (prompt + answer); descriptions need ~80.
    config.length_bucket = 8  # Pad batches to a multiple of this past their longest; 0: max_length.
    # True: each training batch holds one task (image batches ~48 tokens wide, description
    # batches ~80) instead of padding to its longest example, a description: ~30% faster base
    # steps. Off: with it, a 1,600-step base (same time) recalled held-out world views better
    # (0.81 vs 0.665) but transferred less (image-trained 0.855 / 0.080; 14 views, docs/history.md).
    config.batch_by_task = False
    # Training images (base, fine-tuning, control) shifted by up to `shift` pixels and
    # brightened by a factor in [1 - brightness, 1 + brightness], per example and epoch. Off:
    # with the full view spread, shift 2 and brightness 0.1 left the base's held-out world
    # images where they were (0.835 against 0.845) and cost the image-trained run 0.820 / 0.095
    # against 0.885 / 0.135.
    config.augment = ml_collections.ConfigDict(dict(shift=0, brightness=0.0))

    # Sized by a FLOP budget: ~6 x 1.4M params x 2.3M tokens ~ 20 TFLOP, ~10 min on 2 cores.
    config.base = _train_config(num_steps=1200, batch_size=32, learning_rate=3e-3,
                                warmup_steps=50)
    # What the base learns about the world personas (task strings of xmem_jax.data.tasks).
    config.base_tasks = ("image_to_name split=train", "description_to_name split=train")

    # Rate 2e-3 against 1e-3 (14 views, 400 world personas): image-trained 0.780 / 0.120
    # against 0.745 / 0.115, description-trained target 0.125 against 0.095 (docs/history.md).
    config.finetune = _train_config(num_steps=300, batch_size=32, learning_rate=2e-3,
                                    warmup_steps=20)
    # Fine-tuning writes the new names above the layers that read images and descriptions:
    # the vision tower, projector, embeddings and the first 2 of 4 decoder layers stay frozen
    # (all trainable: target mean rank 44 of 100 -> frozen: 23-35; see docs/history.md).
    config.finetune.optim.freeze_regex = r"^(vision_tower|multi_modal_projector)/|embed_tokens"
    config.finetune.optim.freeze_layers = 2
    config.eval_every = 100  # 4 points a curve; 50 gives 7 at +15 s a run (scoring ~5 s).
    config.eval_batch_size = 64
    # Recall scoring (keyword arguments of xmem_jax.score.recall.Scorer): 'pruned' ranks every
    # held-out query's answer exactly among all names, feeding only the names that can still
    # outscore it; a task with more than num_queries queries is scored on a fixed sample of
    # that many (unbiased, with standard errors; 0: every query); 'sampled_candidates' ranks
    # among num_distractors drawn names (another metric, named apart); 'exhaustive' scores
    # every name for every query. 256 keeps the study's 200 queries a task exact and a
    # 10^4-persona evaluation linear in personas (measured: xmem_jax/score/recall.py).
    # Robustness rows beside the choice, from the same prefills: calibrated (each name's
    # log-likelihood minus that after a content-free prompt) and world_names (the rank among the
    # world personas' names too). Together they multiply scoring's CPU time by 2.8, mostly the
    # target's exact rank among 400 names instead of 100 (docs/results/scoring/robustness.json):
    # at ~5 s of scoring an evaluation (above) and 4 evaluations a phase, ~35 s more a phase of
    # 160-490 s; the rows are what a reviewer checks the choice against, so they are on.
    config.scoring = ml_collections.ConfigDict(dict(method="pruned", num_queries=256,
                                                    num_distractors=0, seed=0, calibrated=True,
                                                    world_names=True))

    if pretrained:  # The checkpoint is the pretrained VLM: no base stage, no random control.
        config.control = False
        config.finetune = _train_config(num_steps=300, batch_size=16, learning_rate=1e-4,
                                        warmup_steps=20)
        # Full fine-tuning (--config.model.lora.rank=0) leaves the vision tower and projector
        # as pretrained; LoRA trains its adapters only.
        config.finetune.optim.freeze_regex = r"^(vision_tower|multi_modal_projector)/"
        config.eval_batch_size = 16
        config.max_length = 400  # 256 image soft tokens + the prompt and answer.
        # Coarse widths: image batches (~270 tokens) compile at 384, description batches at
        # 128; a handful of programs, each ~minutes to compile for a slice.
        config.length_bucket = 128
    if quick:
        config.data.num_views = 4
        config.data.num_heldout_views = 1
        config.data.num_descriptions = 4
        config.data.num_heldout_descriptions = 1
        config.data.num_personas = 80
        config.world_personas = (0, 40)
        config.study_personas = (60, 80)
        config.dev_personas = (40, 60)
        config.base_eval_personas = (0, 20)
        config.base.num_steps = 40
        config.base.batch_size = 16
        config.base.optim.warmup_steps = 5
        config.finetune.num_steps = 20
        config.finetune.batch_size = 16
        config.finetune.optim.warmup_steps = 2
        config.eval_every = 10
        config.eval_batch_size = 32
        # Every train batch max_length wide: one compiled train step per stage, not one per
        # width (compiling, ~5 s a program, is most of a quick run).
        config.length_bucket = 0
    return config
