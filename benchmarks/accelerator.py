"""Train-step throughput and MFU on the local accelerators, with random weights and no downloads.

    python benchmarks/accelerator.py                # GPU or TPU: Gemma 3 1B, 4B VLM LoRA 16, full
    python benchmarks/accelerator.py --shapes=tiny  # any machine, in about a minute (tested)

Each shape is the main job's fine-tuning step exactly as the trainer builds it
(`aot.programs.train_program`: shardings, donation, LoRA or full fine-tuning, freezing, remat,
the LM head at answer positions, the attention kernel `VLMConfig.attention` picks for the
backend), on every local device (FSDP over them, or `--mesh=D,F,T`), with random weights
created on their shards and a random batch: a BOS, one image's placeholders where the model has
a vision tower, random text, and an 8-token answer.

    gemma3_1b       text only, 16 rows x 2048 tokens, full fine-tuning (the shape MFU figures
                    of other JAX trainers use)
    gemma3_4b_lora  the study's VLM step: 16 rows x 400 tokens with images, LoRA rank 16
    gemma3_4b_full  the same, full fine-tuning with the vision tower frozen
    tiny            the tiny preset's fine-tuning step (float32), for the CPU

Per shape it prints the step time (median of `--steps` timed steps after `--warmup`), tokens/s
and MFU: the useful FLOPs (`xmem_jax.model.flops`, trainable parameters only get weight
gradients) over the step time and the chips' dense bf16 peak (`CHIP_PEAKS`, or
`--peak_tflops`). The last line is `mfu: X`, the first shape's MFU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # For configs/.
from configs import default as default_config  # noqa: E402
from xmem_jax.aot import programs, topology  # noqa: E402
from xmem_jax.experiments import study  # noqa: E402
from xmem_jax.train import sharding, trainer  # noqa: E402

SHAPES = {
    "gemma3_1b": dict(arg="gemma3_1b", batch=16, length=2048, lora=0),
    "gemma3_4b_lora": dict(arg="gemma3_4b", batch=16, length=400, lora=16),
    "gemma3_4b_full": dict(arg="gemma3_4b", batch=16, length=400, lora=0),
    "tiny": dict(arg="", batch=32, length=88, lora=0),
}
ANSWER_TOKENS = 8
# Dense bf16 peak FLOP/s per chip, by a substring of `device_kind` (vendor data sheets; TPUs
# from `aot.topology.CHIPS`). The CPU figure is the float32 matmul peak of a 2-core laptop
# (measured), only so the tiny shape prints a figure; pass --peak_tflops for another CPU.
CHIP_PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12,
              "A100": 312e12, "L4": 121e12, "cpu": 0.15e12,
              **{kind: chip.bf16_flops for kind, chip in topology.CHIPS.items()}}


def chip_peak(device: jax.Device) -> float:
    kind = device.device_kind if device.platform != "cpu" else "cpu"
    matches = [peak for name, peak in CHIP_PEAKS.items() if name == kind or name in kind]
    if not matches:
        raise SystemExit(f"No peak FLOP/s known for device kind {kind!r}; pass --peak_tflops")
    return matches[0]


def study_config(shape: dict):
    config = default_config.get_config(shape["arg"])
    config.finetune.batch_size = shape["batch"]
    config.max_length = shape["length"]
    config.model.lora.rank = shape["lora"]
    config.finetune.optim.grad_accum_steps = 1
    return config


def random_batch(abstract: dict, model_config, seed: int = 0) -> dict[str, jax.Array]:
    """Arrays of the step's batch shapes, placed on its shardings."""
    rng = np.random.default_rng(seed)
    rows, length = abstract["tokens"].shape
    tokens = rng.integers(9, model_config.text.vocab_size, (rows, length)).astype(np.int32)
    tokens[:, 0] = 2
    if "images" in abstract:
        tokens[:, 1:1 + model_config.mm_tokens_per_image] = model_config.image_token_id
    loss_mask = np.zeros((rows, length), np.float32)
    loss_mask[:, -ANSWER_TOKENS:] = 1
    arrays = {"tokens": tokens, "input_mask": np.ones((rows, length), np.int32),
              "loss_mask": loss_mask}
    if "images" in abstract:
        arrays["images"] = rng.uniform(-1, 1, abstract["images"].shape).astype(np.float32)
    return {name: jax.device_put(array, abstract[name].sharding) for name, array in arrays.items()}


def measure(name: str, mesh: jax.sharding.Mesh, steps: int, warmup: int) -> dict:
    config = study_config(SHAPES[name])
    model_config = study.model_config_for(config)
    program = programs.train_program(config, "finetune", model_config, mesh, ANSWER_TOKENS)
    step, (abstract_state, abstract_batch, _) = program.build(model_config, mesh)
    train_state_fn = trainer.train_state_fn(programs.stage_config(config, "finetune"),
                                            study.model_fn(config, model_config))
    with sharding.use_mesh(mesh):
        state = nnx.state(sharding.create_sharded_model(train_state_fn, mesh))
        batch = random_batch(abstract_batch, model_config)
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = step(state, batch, None)
            float(metrics["loss"])  # Waits for the step.
            if i >= warmup:
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    rows, length = abstract_batch["tokens"].shape
    return {"shape": name, "step_seconds": seconds, "tokens_per_second": rows * length / seconds,
            "useful_flops": program.useful_flops, "unit": program.unit}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="gemma3_1b,gemma3_4b_lora,gemma3_4b_full",
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--mesh", default="", help="D,F,T (default: FSDP over every device)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="per-chip peak (default: by device kind, `CHIP_PEAKS`)")
    args = parser.parse_args()
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"Unknown --shapes {unknown}; known: {', '.join(SHAPES)}")
    devices = jax.devices()
    sizes = [int(s) for s in args.mesh.split(",")] if args.mesh else [1, len(devices), 1]
    mesh = sharding.make_mesh(*sizes, devices=devices)
    peak = args.peak_tflops * 1e12 or chip_peak(devices[0])
    print(f"devices: {len(devices)} x {devices[0].device_kind}, peak {peak / 1e12:.3g} TFLOP/s "
          f"each, mesh data {sizes[0]} x fsdp {sizes[1]} x tensor {sizes[2]}", flush=True)
    results = []
    for name in names:
        result = measure(name, mesh, args.steps, args.warmup)
        result["mfu"] = result["useful_flops"] / result["step_seconds"] / (peak * len(devices))
        results.append(result)
        print(f"{name} ({result['unit']}): step {result['step_seconds'] * 1e3:.1f} ms, "
              f"{result['tokens_per_second']:,.0f} tokens/s, MFU {result['mfu']:.1%}", flush=True)
    print(f"mfu: {results[0]['mfu']:.4f}")


if __name__ == "__main__":
    main()
