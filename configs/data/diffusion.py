"""Synthetic persona dataset drawn by a local diffusers text-to-image pipeline.

    python -m data_gen --config=configs/data/diffusion.py --config.renderer.model_dir=DIR --out_dir=data

DIR is a directory written by `DiffusionPipeline.save_pretrained` (e.g. a Stable Diffusion
checkpoint copied to this machine); nothing is downloaded.
"""

from configs.data import procedural


def get_config(arg: str | None = None):
    config = procedural.get_config(arg)
    config.renderer.name = "diffusion"
    config.image_size = 256
    config.num_personas = 200
    return config
