"""Prints the data path's speed: (a) procedural generation, images/s at 64 px (render + PNG
encode), and (b) the Grain pipeline, examples/s in train mode for image_to_name +
description_to_name on a generated dataset (after warm-up).

    python benchmarks/data.py
    python benchmarks/data.py --data_dir=data  # (b) on an existing dataset, generating none.

It ends with exactly two lines, `images_per_s: X` and `pipeline_examples_per_s: Y` (with the
default record cache, which holds the whole generated dataset: the steady state of multi-epoch
training); the line before says how fast the pipeline is without the cache.
Targets on a 2-core machine: >= 300 images/s and >= 5,000 examples/s.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # For configs/.
from configs.data import procedural  # noqa: E402
from xmem_jax.data import pipeline  # noqa: E402


def generation_images_per_s(num_personas: int, image_size: int, repeats: int) -> float:
    """Render + PNG-encode every view of `num_personas` personas (built beforehand)."""
    from data_gen import dataset as writer
    from data_gen.personas import GeneratorSpec, make_persona
    from data_gen.render import make_renderer

    config = procedural.get_config()
    config.num_personas = num_personas
    config.image_size = image_size
    spec = GeneratorSpec.from_config(config)
    renderer = make_renderer(config.renderer, image_size)
    personas = [make_persona(spec, i) for i in range(num_personas)]
    items = [(p, v) for p in personas for v in p.views]
    batch = config.renderer.batch_size * spec.num_views
    renderer.render(items[:batch])  # Warm-up (imports, caches).
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for k in range(0, len(items), batch):
            for image in renderer.render(items[k:k + batch]):
                writer._encode_png(image)
        best = max(best, len(items) / (time.perf_counter() - start))
    return best


def generate_dataset(out_dir: str, num_personas: int, image_size: int):
    from data_gen import dataset as writer

    config = procedural.get_config()
    config.num_personas = num_personas
    config.image_size = image_size
    return writer.generate(config, out_dir)


def pipeline_examples_per_s(data_dir, args, record_cache_mb: float, examples: int,
                            repeats: int) -> tuple[float, int]:
    """The best of `repeats` timed passes of `examples` after the warm-up, and the epoch size."""
    config = pipeline.default_config()
    config.data_dir = str(data_dir)
    config.tasks = ["image_to_name", "description_to_name"]
    config.batch_size = args.batch_size
    config.max_length = args.max_length
    config.image_size = args.image_size
    config.num_image_tokens = args.num_image_tokens
    config.num_epochs = None
    config.num_threads = args.num_threads
    config.worker_count = args.worker_count
    config.record_cache_mb = record_cache_mb
    built = pipeline.build(config, process_index=0, process_count=1)
    iterator = iter(built)
    for _ in range(args.warmup_batches):
        next(iterator)
    num_batches = max(1, examples // args.batch_size)
    best = 0.0
    for _ in range(repeats):  # The best pass: this machine's cores are shared.
        start = time.perf_counter()
        for _ in range(num_batches):
            batch = next(iterator)
        best = max(best, num_batches * args.batch_size / (time.perf_counter() - start))
    assert batch["tokens"].shape == (args.batch_size, args.max_length)
    assert np.isfinite(batch["images"]).all()
    if hasattr(iterator, "close"):
        iterator.close()
    return best, built.num_examples


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gen_personas", type=int, default=400,
                        help="personas rendered for (a) (8 views each)")
    parser.add_argument("--gen_image_size", type=int, default=64)
    parser.add_argument("--data_dir", default="",
                        help="dataset for (b); default: generate one in a temporary folder")
    parser.add_argument("--data_personas", type=int, default=600,
                        help="personas in the generated dataset for (b)")
    parser.add_argument("--examples", type=int, default=20000, help="examples timed per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes; the best is printed")
    parser.add_argument("--warmup_batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=192)
    parser.add_argument("--image_size", type=int, default=64, help="the model's image size")
    parser.add_argument("--num_image_tokens", type=int, default=16)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--worker_count", type=int, default=0)
    parser.add_argument("--record_cache_mb", type=float, default=256,
                        help="the pipeline's persona record cache (0: none)")
    parser.add_argument("--skip_generation", action="store_true",
                        help="skip (a) (prints images_per_s: nan)")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)

    images_per_s = float("nan")
    if not args.skip_generation:
        images_per_s = generation_images_per_s(args.gen_personas, args.gen_image_size, 2)
        print(f"generation: {args.gen_personas} personas x 8 views at {args.gen_image_size} px")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or generate_dataset(tmp, args.data_personas, args.image_size)
        # Every example reads and decodes its record: the cost when the dataset is much
        # larger than the cache (first epochs of big datasets).
        uncached, epoch = pipeline_examples_per_s(data_dir, args, 0, 6400, 1)
        examples_per_s, epoch = pipeline_examples_per_s(
            data_dir, args, args.record_cache_mb, args.examples, args.repeats)
    print(f"pipeline: train mode, {epoch} examples per epoch, batch {args.batch_size}, "
          f"length {args.max_length}, {args.image_size} px, threads {args.num_threads}, "
          f"workers {args.worker_count}")
    print(f"pipeline without record cache: {uncached:.1f} examples/s")
    print(f"pipeline with a {args.record_cache_mb:g} MB record cache, best of {args.repeats} "
          f"passes of {args.examples} examples:")
    print(f"images_per_s: {images_per_s:.1f}")
    print(f"pipeline_examples_per_s: {examples_per_s:.1f}")


if __name__ == "__main__":
    main()
