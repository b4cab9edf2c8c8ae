"""Times one training step (forward, backward, clipped AdamW update) of our JAX trainer against
the same architecture in transformers + PyTorch (eager), on CPU, in one run.

    python benchmarks/train_step.py --config=tiny --batch=16 --length=64 --repeats=5
    python benchmarks/train_step.py --text_only   # rows without images: the tower skipped or not

Both sides get the same sizes (a `Gemma3ForConditionalGeneration` built from the preset's
config.json, `hf.hf_config_dict`), batch, sequence length, answer-only loss and optimizer.
Each repeat times
`--steps` consecutive steps; the medians of the per-step times are compared. FLOPs are counted
analytically (matmuls and attention, backward = 2 x forward); MFU is against `--peak_gflops`.
The last line is `speedup_vs_transformers: X` (PyTorch step time / JAX step time).

`--text_only` gives every row text only (no image placeholders, zero pixels, `has_image`
False): the trainer then drops the images and skips the vision tower; each JAX variant is also
timed as `+tower`, fed the zero images as before that change, which measures the skip.
`--before` also times each JAX variant as the step was before the lean step (0f9db67): the LM
head at every position and the tower on every row. `--remat` takes a `VLMConfig.remat` policy
(none, full, dots, qkv).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from xmem_jax.model import VLM, VLMConfig, count_parameters, get_model_config, hf
from xmem_jax.provenance import source_commit
from xmem_jax.train import sharding, trainer

ANSWER_LENGTH = 8


def make_batch(config: VLMConfig, batch: int, length: int, seed: int = 0,
               text_only: bool = False) -> dict[str, np.ndarray]:
    """<bos>, one image's placeholders (none if `text_only`), random text; the last
    ANSWER_LENGTH tokens are the answer (loss_mask = 1)."""
    rng = np.random.default_rng(seed)
    image_tokens = config.mm_tokens_per_image
    if length < 2 + image_tokens + ANSWER_LENGTH:
        raise ValueError(f"--length must be at least {2 + image_tokens + ANSWER_LENGTH}")
    tokens = rng.integers(9, config.text.vocab_size, (batch, length)).astype(np.int32)
    tokens[:, 0] = 2
    if not text_only:
        tokens[:, 1:1 + image_tokens] = config.image_token_id
    loss_mask = np.zeros((batch, length), np.float32)
    loss_mask[:, -ANSWER_LENGTH:] = 1
    size = config.vision.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    return {"tokens": tokens, "input_mask": np.ones((batch, length), np.int32),
            "loss_mask": loss_mask, "images": images * (not text_only),
            "has_image": np.full(batch, not text_only)}


def train_step_flops(config: VLMConfig, batch: int, length: int, images: bool = True) -> float:
    """Matmul and attention FLOPs of forward + backward (3 x forward), full L x L attention;
    the tower's only with `images`."""
    text, vision = config.text, config.vision
    e, q, kv = text.embed_dim, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    per_token = text.num_layers * (2 * e * (2 * q + 2 * kv) + 2 * 3 * e * text.mlp_dim
                                   + 2 * 2 * length * q)
    per_token += 2 * e * text.vocab_size  # Tied LM head.
    forward = batch * length * per_token
    if vision is not None and images:
        w, patches = vision.width, vision.num_patches
        per_patch = 2 * vision.patch_size**2 * 3 * w + vision.depth * (
            2 * 4 * w * w + 2 * 2 * w * vision.mlp_dim + 2 * 2 * patches * w)
        forward += batch * (patches * per_patch + config.mm_tokens_per_image * 2 * w * e)
    return 3.0 * forward


def time_steps(step, repeats: int, steps: int) -> list[float]:
    """Per-step seconds: the median step of each repeat."""
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return medians


def jax_step(config: VLMConfig, batch: dict[str, np.ndarray], num_steps: int,
             skip_tower: bool = True, answer_head: bool = True):
    """Our trainer's jitted step on one device; returns a callable running one step. As in
    `trainer.train`, a batch without image rows goes without images (unless not `skip_tower`)
    and the LM head reads only its answer positions (unless not `answer_head`: every position,
    as before 0f9db67)."""
    train_config = trainer.default_config()
    train_config.batch_size = batch["tokens"].shape[0]
    train_config.num_steps = num_steps
    train_config.optim.warmup_steps = 0
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    init_fn = trainer.train_state_fn(train_config, lambda: VLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract = sharding.abstract_model(init_fn, mesh)
    state = nnx.state(sharding.create_sharded_model(init_fn, mesh))
    longest_answer, any_image = trainer.batch_facts(batch)
    # No cap (and the default max_answer_tokens 0): the head at every position.
    answer_cap = trainer.choose_answer_cap(longest_answer, 0) if answer_head else None
    step = trainer.make_train_step(graphdef, train_config, sharding.state_shardings(abstract),
                                   mesh, answer_cap=answer_cap)
    if skip_tower and not any_image:
        batch = {key: value for key, value in batch.items() if key != "images"}
    batch_sharding = jax.sharding.NamedSharding(mesh, trainer.batch_partition())
    device_batch = trainer.make_global_batch(batch, batch_sharding, train_config.batch_size)
    holder = {"state": state}

    def run():
        with sharding.use_mesh(mesh):
            holder["state"], metrics = step(holder["state"], device_batch, None)
        return float(metrics["loss"])

    start = time.perf_counter()
    loss = run()
    return run, loss, time.perf_counter() - start


def torch_step(config: VLMConfig, batch: dict[str, np.ndarray], attention: str):
    """transformers' Gemma3ForConditionalGeneration, same loss (labels -100 off the answer) and
    optimizer (clip to norm 1, AdamW); returns a callable running one step."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration._from_config(
        Gemma3Config.from_dict(hf.hf_config_dict(config)), attn_implementation=attention)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    tokens = torch.from_numpy(batch["tokens"]).long()
    inputs = {
        "input_ids": tokens,
        "attention_mask": torch.from_numpy(batch["input_mask"]).long(),
        "token_type_ids": (tokens == config.image_token_id).long(),
        "labels": torch.where(torch.from_numpy(batch["loss_mask"]) > 0, tokens, -100),
    }
    if batch["has_image"].any():
        inputs["pixel_values"] = torch.from_numpy(batch["images"]).permute(0, 3, 1,
                                                                           2).contiguous()

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    start = time.perf_counter()
    loss = run()
    return run, loss, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per repeat.")
    parser.add_argument("--layers", default="scanned,unrolled",
                        help="JAX variants to time: 'scanned' and/or 'unrolled' decoder layers.")
    parser.add_argument("--remat", default="none", help="A VLMConfig.remat policy.")
    parser.add_argument("--text_only", action="store_true",
                        help="Rows without images; also time the tower run on zero images.")
    parser.add_argument("--before", action="store_true",
                        help="Also time each JAX variant as before the lean step: the LM head "
                             "at every position and the tower on every row.")
    parser.add_argument("--torch_attention", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
    parser.add_argument("--peak_gflops", type=float, default=150.0,
                        help="Peak float32 GFLOP/s of this machine, for MFU.")
    parser.add_argument("--out", default="", help="Also write the figures here as JSON.")
    args = parser.parse_args()

    config = get_model_config(args.config, remat=args.remat)
    batch = make_batch(config, args.batch, args.length, text_only=args.text_only)
    flops = train_step_flops(config, args.batch, args.length, images=not args.text_only)
    num_params = count_parameters(nnx.eval_shape(lambda: VLM(config, rngs=nnx.Rngs(0))))
    print(f"{args.config}: {num_params:,} parameters; batch {args.batch} x "
          f"{args.length} tokens; {flops / 1e9:.2f} GFLOP per train step (analytic); "
          f"{os.cpu_count()} CPU cores; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    import torch

    torch.set_num_threads(args.torch_threads)
    total_steps = 1 + 2 * args.repeats * args.steps
    runs = {}
    for layers in args.layers.split(","):
        if layers not in ("scanned", "unrolled"):
            parser.error(f"--layers: unknown variant {layers!r}")
        variant = dataclasses.replace(config, scan_layers=layers == "scanned")
        runs[f"jax {layers}"] = jax_step(variant, batch, total_steps)
        if args.text_only:
            runs[f"jax {layers} +tower"] = jax_step(variant, batch, total_steps,
                                                    skip_tower=False)
        if args.before:
            runs[f"jax {layers} before"] = jax_step(variant, batch, total_steps,
                                                    skip_tower=False, answer_head=False)
    torch_name = f"torch {args.torch_attention}"
    runs[torch_name] = torch_step(config, batch, args.torch_attention)
    for name, (_, loss, first) in runs.items():
        print(f"{name:20s} first step {first:6.2f} s (JAX: with compilation), loss {loss:.3f}")
    # Interleaved repeats, so that load from other processes hits every side alike.
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (run, _, _) in runs.items():
            times[name] += time_steps(run, 1, args.steps)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        achieved = flops / median / 1e9
        print(f"{name:20s} median {median * 1e3:7.1f} ms/step (repeats "
              f"{', '.join(f'{t * 1e3:.1f}' for t in times[name])}), "
              f"{achieved:5.1f} GFLOP/s, MFU {achieved / args.peak_gflops:.1%}")
    best_jax = min((m, name) for name, m in medians.items()
                   if name.startswith("jax") and not name.endswith(("+tower", "before")))
    print(f"fastest JAX variant: {best_jax[1]}; torch threads: {args.torch_threads}")
    speedup = medians[torch_name] / best_jax[0]
    if args.out:
        figures = {"command": " ".join(["python", "benchmarks/train_step.py", *sys.argv[1:]]),
                   "commit": source_commit(), "cpu_cores": os.cpu_count(),
                   "gflop_per_step": flops / 1e9, "median_seconds": medians,
                   "repeat_seconds": times, "speedup_vs_transformers": speedup}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"speedup_vs_transformers: {speedup:.2f}")


if __name__ == "__main__":
    main()
