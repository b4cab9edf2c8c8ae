"""Mitigation: the transfer study with bridge personas, a captioning auxiliary task, or bridge
personas with a contrastive loss aligning their image and description states.

    python -m xmem_jax.main --config=configs/experiments/mitigation.py --workdir=runs/mitigation
    python -m xmem_jax.main --config=configs/experiments/mitigation.py \
        --config.train_modality=description --workdir=runs/mitigation_description

Every method trains for the same steps and batch size on the same seeds and starts from the
default base model (shared cache). Bridge personas (400, 500) are in neither the world nor the
study set. On a TPU: `configs/experiments/mitigation.py:gemma3_4b --config.model.checkpoint=DIR`.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.get_config(arg)
    config.experiment = "mitigation"
    config.control = False
    config.seeds = (0,) if arg == "quick" else (0, 1, 2)
    quick = arg == "quick"
    # Each method's training tasks: {source} is the study task's kind (image_to_name or
    # description_to_name), {study} and {bridge} the persona ranges.
    config.mitigation = dict(
        bridge_personas=(0, 10) if quick else (400, 500),
        max_length=112,  # Fine-tuning's token limit: captions are longer than names.
        # Each example's answer tokens share one weight ('token': every token alike), and the
        # study names get study_share of the gradient in every method that mixes in others
        # (xmem_jax/experiments/mitigation.py).
        loss_normalization="example",
        study_share=0.5,
        methods=dict(
            none=("{source} split=train personas={study}",),
            bridge=("{source} split=train personas={study}",
                    "image_to_name split=train personas={bridge}",
                    "description_to_name split=train personas={bridge}"),
            # Captioning has 6 examples per view (one per training description): the names
            # task is listed 6 times so that half of every batch's rows still ask for names
            # (their gradient share is set by study_share).
            caption=("{source} split=train personas={study} repeat=6",
                     "image_to_description split=train personas={study}"),
            # The bridge tasks, each bridge image row paired with a description row of its
            # persona in the batch, plus the contrastive loss below over those pairs.
            contrastive=("{source} split=train personas={study}",
                         "image_to_name split=train personas={bridge}",
                         "description_to_name split=train personas={bridge}")),
        # The contrastive method's InfoNCE (xmem_jax/train/losses.py), on the state the
        # alignment probe measures: the residual stream at the prompt's last token.
        contrastive=dict(
            # After decoder layer 3: where the probe found the base's shared code strongest
            # (study retrieval 0.405 against 0.345-0.365 after layers 1, 2 and 4; 7cffb23,
            # docs/history.md), and the first layer fine-tuning trains (freeze_layers=2).
            layer=3,
            # SimCLR's and SupCon's value for cosine similarities: a pair at cosine 1 against
            # negatives at 0 gets e^10 times their softmax mass, so near-misses still pull.
            temperature=0.1,
            # Added to the mean answer loss. InfoNCE at chance is log(pairs a batch), ~2.4 for
            # the ~11 pairs of a default batch, the order of the answers' loss early in
            # fine-tuning; after the quick run's 20 steps it was 0.88 against 3.35 for the
            # answers: it pulls without outweighing the names that are scored.
            weight=1.0))
    if quick:  # Bridge personas must avoid the world ones: move the world up.
        config.world_personas = (10, 40)
        config.base_eval_personas = (10, 20)
    return config
