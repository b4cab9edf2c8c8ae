"""Prints the data path's speed: (a) procedural generation, images/s at 64 px (render + PNG
encode), and (b) the Grain pipeline, examples/s in train mode for image_to_name +
description_to_name on a generated dataset (after warm-up); or, with --scale, (c) a large
dataset generated in parallel shards and read back.

    python benchmarks/data.py
    python benchmarks/data.py --data_dir=data  # (b) on an existing dataset, generating none.
    python benchmarks/data.py --scale=100000 --processes=2 --shards=16 \
        --out=docs/results/data/scale_100000.json  # (c) only.

It ends with exactly two lines, `images_per_s: X` and `pipeline_examples_per_s: Y` (with the
default record cache, which holds the whole generated dataset: the steady state of multi-epoch
training); the line before says how fast the pipeline is without the cache.
Targets on a 2-core machine: >= 300 images/s and >= 5,000 examples/s.

(c) runs `python -m data_gen ... --config.num_shards=S --config.shard_index=K` once per shard,
--processes of them at a time, all writing into one directory (whichever finishes last
finalizes it), then opens the dataset with `source.open_dataset`, decodes its first and last
persona records, and builds a pipeline over its last 100 personas and reads a batch. The shape
is `--data_overrides` (default: 4 views, 1 held out, at 32 px, the tiny model's image size, a
cheaper shape than the default data config's 8 views at 64 px); the time at that default is
estimated from the measured time, scaled by its images and by their relative cost (render + PNG
encode at 64 px against the shape's size, timed here in one process). It ends with
`generation_records_per_s: X`; --out writes every figure as JSON with the command and commit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # For configs/.
from configs.data import procedural  # noqa: E402
from xmem_jax.data import pipeline, source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def generation_images_per_s(num_personas: int, image_size: int, repeats: int,
                            clock=time.perf_counter) -> float:
    """Render + PNG-encode every view of `num_personas` personas (built beforehand): images per
    second of `clock` (`time.process_time`: per CPU second, whatever else the cores run)."""
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
        start = clock()
        for k in range(0, len(items), batch):
            for image in renderer.render(items[k:k + batch]):
                writer._encode_png(image)
        best = max(best, len(items) / (clock() - start))
    return best


def generate_dataset(out_dir: str, num_personas: int, image_size: int):
    from data_gen import dataset as writer

    config = procedural.get_config()
    config.num_personas = num_personas
    config.image_size = image_size
    return writer.generate(config, out_dir)


def generate_in_shards(out_dir: Path, log_dir: Path, num_personas: int, num_shards: int,
                       num_processes: int, overrides: list[str]) -> None:
    """Runs `python -m data_gen` once per shard, `num_processes` at a time, into `out_dir`."""
    flags = [f"--config.{o}" for o in overrides]
    pending, running = list(range(num_shards)), {}
    while pending or running:
        while pending and len(running) < num_processes:
            shard = pending.pop(0)
            log = (log_dir / f"shard-{shard}.log").open("w")
            running[shard] = (subprocess.Popen(
                [sys.executable, "-m", "data_gen", "--config=configs/data/procedural.py",
                 f"--out_dir={out_dir}", f"--config.num_personas={num_personas}",
                 f"--config.num_shards={num_shards}", f"--config.shard_index={shard}", *flags],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(0.2)
        for shard, (process, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[shard]
            if process.returncode:
                for other, _ in running.values():  # They would write into a deleted folder.
                    other.kill()
                tail = (log_dir / f"shard-{shard}.log").read_text()[-2000:]
                raise RuntimeError(f"Shard {shard} failed (exit {process.returncode}):\n{tail}")


def read_back(data_dir: Path, num_personas: int, image_size: int, tail_personas: int) -> dict:
    """Opens the dataset, decodes its first and last records, and reads one batch of a
    pipeline over its last `tail_personas` personas."""
    start = time.perf_counter()
    dataset = source.open_dataset(data_dir)
    if len(dataset) != num_personas:
        raise RuntimeError(f"{data_dir} holds {len(dataset)} records, not {num_personas}")
    ends = [dataset[0], dataset[num_personas - 1]]
    for index, record in zip((0, num_personas - 1), ends):
        if record.persona_id != index:
            raise RuntimeError(f"Record {index} holds persona {record.persona_id}")
        for png in record.images:
            pipeline.decode_image(png, image_size)
    first = num_personas - tail_personas
    config = pipeline.default_config()
    config.data_dir = str(data_dir)
    config.tasks = [f"image_to_name split=train personas={first}:{num_personas}",
                    f"description_to_name split=train personas={first}:{num_personas}"]
    config.max_length = 192
    config.image_size = image_size
    batch = next(iter(pipeline.build(config, process_index=0, process_count=1)))
    ids = batch["persona_id"]
    if not (first <= ids.min() and ids.max() < num_personas):
        raise RuntimeError(f"A batch of personas={first}:{num_personas} holds persona ids "
                           f"{ids.min()}-{ids.max()}")
    return {"records": len(dataset),
            "first_record": {"persona_id": ends[0].persona_id, "name": ends[0].name,
                             "views": len(ends[0].images)},
            "last_record": {"persona_id": ends[1].persona_id, "name": ends[1].name,
                            "views": len(ends[1].images)},
            "pipeline_personas": f"{first}:{num_personas}",
            "pipeline_batch": {key: list(batch[key].shape) for key in ("tokens", "images")},
            "pipeline_batch_persona_ids": [int(ids.min()), int(ids.max())],
            "read_back_s": round(time.perf_counter() - start, 2)}


def scale(args) -> dict:
    """(c): generates `args.scale` personas in shards, reads them back; the figures."""
    with tempfile.TemporaryDirectory(prefix="xmem_scale_") as tmp:
        return scale_in(Path(args.scale_dir or tmp), args)


def scale_in(work: Path, args) -> dict:
    """`scale`, writing the dataset and each shard's log under `work`."""
    data_dir, log_dir = work / "data", work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    generate_in_shards(data_dir, log_dir, args.scale, args.shards, args.processes,
                       args.data_overrides)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage.ru_utime - children.ru_utime) + (usage.ru_stime - children.ru_stime)
    dataset = source.open_dataset(data_dir)
    shape = dataset.generator_config
    views, image_size = int(shape["num_views"]), int(shape["image_size"])
    num_bytes = sum(p.stat().st_size for p in Path(dataset.path).rglob("*") if p.is_file())
    figures = {
        "personas": args.scale, "shards": args.shards, "processes": args.processes,
        "data_overrides": args.data_overrides, "views_per_persona": views,
        "heldout_views_per_persona": int(shape["num_heldout_views"]),
        "descriptions_per_persona": int(shape["num_descriptions"]), "image_size": image_size,
        "generation_wall_s": round(wall, 1), "generation_cpu_s": round(cpu, 1),
        "generation_records_per_s": round(args.scale / wall, 1),
        "generation_images_per_s": round(args.scale * views / wall, 1),
        "shard_files": len(list(Path(dataset.path).glob("*.array_record-*"))),
        "disk_bytes": num_bytes, "disk_bytes_per_persona": round(num_bytes / args.scale),
        "read_back": read_back(data_dir, args.scale, image_size, min(100, args.scale)),
    }
    default = procedural.get_config()
    # Render + PNG encode per CPU second, in this process: the images' cost at the shape's size
    # and at the default's.
    per_cpu_s = {size: generation_images_per_s(args.calibration_personas, size, 2,
                                               clock=time.process_time)
                 for size in sorted({image_size, default.image_size})}
    extra_cpu = args.scale * (default.num_views / per_cpu_s[default.image_size]
                              - views / per_cpu_s[image_size])
    estimated_cpu = cpu + extra_cpu
    estimated_wall = estimated_cpu * wall / cpu  # At the CPU share this run had.
    figures["estimate_at_default_shape"] = {
        "what": (f"an estimate, not measured: the measured CPU time plus the extra render + "
                 f"PNG encode of {default.num_views} views at {default.image_size} px instead "
                 f"of {views} at {image_size} px (per-image CPU cost timed in one process), "
                 f"at the measured CPU share ({cpu / wall:.2f} cores)"),
        "images_per_cpu_s": {str(size): round(rate, 1) for size, rate in per_cpu_s.items()},
        "views_per_persona": default.num_views, "image_size": default.image_size,
        "cpu_s": round(estimated_cpu), "wall_s": round(estimated_wall),
        "images_per_s": round(args.scale * default.num_views / estimated_wall, 1)}
    return figures


def write_results(args, figures: dict) -> None:
    """Writes `figures` to `--out` with the command, the commit and the machine."""
    from xmem_jax.provenance import source_commit

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "commit": source_commit(),
        "cpu_cores": os.cpu_count(), **figures}, indent=1) + "\n")
    print(f"Wrote {args.out}")


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
    parser.add_argument("--scale", type=int, default=0,
                        help="(c) only: personas generated in shards and read back")
    parser.add_argument("--processes", type=int, default=2,
                        help="(c): data_gen processes running at a time")
    parser.add_argument("--shards", type=int, default=16, help="(c): shards of the dataset")
    parser.add_argument("--data_overrides", nargs="*",
                        default=["image_size=32", "num_views=4", "num_heldout_views=1"],
                        help="(c): data config fields KEY=VALUE (configs/data/procedural.py)")
    parser.add_argument("--scale_dir", default="",
                        help="(c): where the dataset is written and kept; default: a temporary "
                             "folder, deleted after")
    parser.add_argument("--calibration_personas", type=int, default=50,
                        help="(c): personas (8 views each) timed per image size for the "
                             "estimate at the default shape")
    parser.add_argument("--out", default="", help="(c): also write the figures to this JSON")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)

    if args.scale:
        figures = scale(args)
        for key, value in figures.items():
            if key != "generation_records_per_s":
                print(f"{key}: {json.dumps(value)}")
        if args.out:
            write_results(args, figures)
        print(f"generation_records_per_s: {figures['generation_records_per_s']}")
        return

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
