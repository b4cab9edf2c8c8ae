"""Prints a model's parameter count, its train-step (forward + backward) time, and how compile
time grows with depth, scanned vs unrolled.

    python benchmarks/model_speed.py --config=tiny --batch=32 --length=64 --depths=4,16
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xmem_jax.model import VLM, VLMConfig, count_parameters, get_model_config


def make_batch(config: VLMConfig, batch: int, length: int) -> dict[str, jax.Array]:
    """[BOS, image placeholders, random text] rows, padded or cut to `length`, plus images."""
    text_len = length - 1 - config.mm_tokens_per_image
    text = jax.random.randint(jax.random.key(0), (batch, text_len), 9, config.text.vocab_size)
    tokens = jnp.concatenate([jnp.full((batch, 1), 2),
                              jnp.full((batch, config.mm_tokens_per_image), config.image_token_id),
                              text], axis=1).astype(jnp.int32)
    size = config.vision.image_size
    images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1.0, maxval=1.0)
    return {"tokens": tokens, "images": images}


def train_step_fn(graphdef: nnx.GraphDef):
    """Mean next-token cross-entropy and its gradient, as a pure function of the state."""

    def loss_and_grads(state: nnx.State, batch: dict[str, jax.Array]):
        def loss(state):
            logits = nnx.merge(graphdef, state)(batch["tokens"], batch["images"])
            targets = jnp.roll(batch["tokens"], -1, axis=1)
            log_probs = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(log_probs, targets[:, :-1, None], axis=-1))

        return jax.value_and_grad(loss)(state)

    return loss_and_grads


def compile_seconds(config: VLMConfig, batch: dict[str, jax.Array], repeats: int = 2) -> float:
    """Best of `repeats` fresh trace-and-compiles (a shared CPU makes single timings noisy)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VLM(config, rngs=nnx.Rngs(0))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.jit(train_step_fn(graphdef)).lower(state, batch).compile()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--depths", default="4,16", help="Decoder depths to compile.")
    args = parser.parse_args()

    config = get_model_config(args.config)
    batch = make_batch(config, args.batch, args.length)
    model = nnx.jit(lambda: VLM(config, rngs=nnx.Rngs(0)))()
    print(f"{args.config}: {count_parameters(model):,} parameters on {jax.devices()[0].platform}")
    graphdef, state = nnx.split(model)

    step = jax.jit(train_step_fn(graphdef))
    jax.block_until_ready(step(state, batch))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(step(state, batch))
        times.append(time.perf_counter() - start)
    print(f"forward+backward, batch {args.batch} x {args.length} tokens: "
          f"median {np.median(times) * 1e3:.1f} ms, min {np.min(times) * 1e3:.1f} ms "
          f"over {args.steps} steps")

    for scan in (True, False):
        for depth in map(int, args.depths.split(",")):
            deep = dataclasses.replace(config, scan_layers=scan,
                                       text=dataclasses.replace(config.text, num_layers=depth))
            print(f"compile forward+backward, {depth:3d} decoder layers, "
                  f"{'scanned ' if scan else 'unrolled'}: {compile_seconds(deep, batch):.2f} s")


if __name__ == "__main__":
    main()
