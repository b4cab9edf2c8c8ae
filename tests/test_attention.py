"""Attention kernels against the einsum reference, forward and backward, for every mask the model
uses (causal, padding, sliding window, image blocks, full); fused paths compiled for a TPU slice
show up as custom calls. Splash runs in Pallas interpret mode on the CPU. And the accelerator
benchmark runs at a tiny size on the CPU."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xmem_jax.model import VLM, attention, get_model_config
from xmem_jax.train import sharding

BATCH, LENGTH = 2, 40


def inputs(num_heads, num_kv_heads, head_dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (BATCH, LENGTH, num_heads, head_dim))
    k, v = (jax.random.normal(key, (BATCH, LENGTH, num_kv_heads, head_dim)) for key in keys[1:])
    return q, k, v


# Row 0 is unpadded, row 1 left-padded by 5; each has one image of 8 tokens at its own offset.
SLOTS = jnp.arange(LENGTH)[None]
VALID = SLOTS >= jnp.array([[0], [5]])
IMAGE_STARTS = jnp.array([[3], [9]])
BLOCKS = jnp.where((SLOTS >= IMAGE_STARTS) & (SLOTS < IMAGE_STARTS + 8), 0, -1)

CASES = {
    "causal_padding": dict(valid=VALID),
    "local_window": dict(valid=VALID, window=7, is_global=jnp.asarray(False)),
    "global_layer_of_a_windowed_model": dict(valid=VALID, window=7, is_global=jnp.asarray(True)),
    "images_and_window": dict(valid=VALID, window=7, is_global=jnp.asarray(False),
                              images=attention.image_slots(BLOCKS, 8)),
    "images_unwindowed": dict(valid=VALID, images=attention.image_slots(BLOCKS, 8)),
    "full_bidirectional": dict(causal=False),  # The vision tower.
}


def outputs_and_grads(implementation, q, k, v, **mask):
    def loss(q, k, v):
        out = attention.self_attention(q, k, v, scale=0.3, implementation=implementation, **mask)
        out = jnp.where(VALID[:, :, None, None], out, 0.0)  # Padding queries' outputs are unused.
        return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_same(reference, fused, atol):
    for expected, actual in zip(jax.tree.leaves(reference), jax.tree.leaves(fused)):
        np.testing.assert_allclose(actual, expected, atol=atol)


@pytest.mark.parametrize("case", CASES)
def test_splash_matches_the_reference_forward_and_backward(case):
    q, k, v = inputs(num_heads=4, num_kv_heads=2, head_dim=16)
    assert_same(outputs_and_grads("xla", q, k, v, **CASES[case]),
                outputs_and_grads("splash", q, k, v, **CASES[case]), atol=2e-5)


def test_splash_pads_a_head_dim_off_the_tpu_lanes():
    q, k, v = inputs(num_heads=2, num_kv_heads=2, head_dim=72)  # Gemma 3's SigLIP head dim.
    assert_same(outputs_and_grads("xla", q, k, v, causal=False),
                outputs_and_grads("splash", q, k, v, causal=False), atol=2e-5)


def test_splash_in_shard_map_matches_on_a_mesh_with_fewer_kv_heads_than_tensor_shards():
    q, k, v = inputs(num_heads=4, num_kv_heads=1, head_dim=16)  # As Gemma 3 1B: one KV head.
    mask = CASES["images_and_window"]
    with sharding.use_mesh(sharding.make_mesh(data=2, fsdp=2, tensor=2)):
        fused = outputs_and_grads("splash", q, k, v, **mask)
    assert_same(outputs_and_grads("xla", q, k, v, **mask), fused, atol=2e-5)


def test_auto_is_xla_on_the_cpu_and_unknown_names_are_listed():
    assert attention.resolve("auto", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="auto, xla, splash, cudnn"):
        attention.resolve("flash", jnp.float32)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a CUDA GPU")
def test_cudnn_matches_the_reference_forward_and_backward():
    q, k, v = (x.astype(jnp.bfloat16) for x in inputs(num_heads=4, num_kv_heads=2, head_dim=64))
    for mask in (CASES["causal_padding"], CASES["images_and_window"]):
        assert_same(outputs_and_grads("xla", q, k, v, **mask),
                    outputs_and_grads("cudnn", q, k, v, **mask), atol=3e-2)


def test_the_vlm_gives_the_same_logits_through_splash():
    config = get_model_config("tiny")
    model = nnx.jit(lambda: VLM(config, rngs=nnx.Rngs(0)))()
    splash_config = dataclasses.replace(config, attention="splash")
    fused = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: VLM(splash_config, rngs=nnx.Rngs(0)))),
                      nnx.state(model))
    tokens = jnp.concatenate([jnp.full((BATCH, 1), 2), jnp.full((BATCH, 16), config.image_token_id),
                              jax.random.randint(jax.random.key(1), (BATCH, 20), 9, 1000)],
                             axis=1).astype(jnp.int32)
    images = jax.random.uniform(jax.random.key(2), (BATCH, 32, 32, 3), minval=-1.0, maxval=1.0)
    input_mask = jnp.arange(tokens.shape[1])[None] >= jnp.array([[0], [3]])
    logits = [nnx.jit(lambda m: m(tokens, images, input_mask))(m) for m in (model, fused)]
    real = np.asarray(input_mask)
    np.testing.assert_allclose(np.asarray(logits[1])[real], np.asarray(logits[0])[real],
                               atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_compiles_for_a_tpu_slice_as_a_custom_call_not_the_einsum(causal):
    from xmem_jax.aot import topology

    length, heads, head_dim = 256, 4, 128
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2,
                              devices=topology.slice_devices("v5p:2x2x1"))
    q = jax.ShapeDtypeStruct((4, length, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, length, 2, head_dim), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(attention.self_attention(q, k, v, scale=0.1, implementation="auto",
                                                causal=causal, window=128 if causal else None,
                                                is_global=jnp.asarray(False) if causal else None)
                       .astype(jnp.float32))

    with sharding.use_mesh(mesh):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
    assert "tpu_custom_call" in hlo
    # No [.., L, L] attention-score tensor: the reference's einsum would make one.
    assert f"{length},{length}]" not in hlo


@pytest.mark.slow
def test_the_accelerator_benchmark_runs_the_tiny_shape_on_the_cpu():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--shapes=tiny",
                           "--steps=1", "--warmup=1"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"mfu: (\d+\.\d+)", last)
    assert match and 0 < float(match.group(1)) < 1, done.stdout
