"""Synthetic persona dataset drawn by the offline procedural renderer (the default).

    python -m data_gen --config=configs/data/procedural.py --out_dir=data

Overrides, e.g. `--config.num_personas=100000 --config.num_shards=16 --config.shard_index=3`.
"""

import ml_collections

from data_gen.attributes import ATTRIBUTE_NAMES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_personas = 600
    config.num_views = 8
    config.num_heldout_views = 2
    config.num_descriptions = 8
    config.num_heldout_descriptions = 2
    config.image_size = 64
    # How much views of one persona differ (position, scale, tilt, background, lighting,
    # noise), in [0, 1]: 1 is the full spread, 0 renders every view alike.
    config.view_variation = 1.0
    # The held-out views' spread (None: view_variation; up to 3, past the full spread).
    config.heldout_view_variation = ml_collections.FieldReference(None, field_type=float)
    # Visual attributes that vary (comma-separated); the others keep their first value.
    config.attributes = ",".join(ATTRIBUTE_NAMES)
    config.renderer = ml_collections.ConfigDict()
    config.renderer.name = "procedural"
    # Used by the diffusion renderer only (see configs/data/diffusion.py).
    config.renderer.model_dir = ""
    config.renderer.num_inference_steps = 25
    config.renderer.guidance_scale = 6.0
    config.renderer.batch_size = 8
    config.renderer.device = "auto"
    # Sharded generation: shard_index=-1 writes every shard in this process.
    config.num_shards = 1
    config.shard_index = -1
    config.tokenizer_vocab_size = 1024
    config.contact_sheet_personas = 8
    return config
