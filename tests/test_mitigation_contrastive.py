"""The mitigation experiment's contrastive method: the InfoNCE, the pairs the pipeline builds
for it, and the gradient it sends through the train step (its quick run:
tests/test_experiments.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from configs.experiments import mitigation as mitigation_config
from xmem_jax.data import pipeline
from xmem_jax.experiments import mitigation
from xmem_jax.model import VLM, get_model_config
from xmem_jax.train import losses, sharding, trainer


def numpy_info_nce(states, pair_id, is_image, temperature):
    """Symmetric InfoNCE, one positive per anchor, written out row by row."""
    states = np.asarray(states, np.float64)
    image_rows = [i for i in range(len(states)) if pair_id[i] >= 0 and is_image[i]]
    text_rows = [i for i in range(len(states)) if pair_id[i] >= 0 and not is_image[i]]
    unit = states.copy()
    for rows in (image_rows, text_rows):
        unit[rows] -= states[rows].mean(0)
        unit[rows] /= np.linalg.norm(unit[rows], axis=1, keepdims=True)
    total = 0.0
    for anchors, others in ((image_rows, text_rows), (text_rows, image_rows)):
        for a in anchors:
            logits = np.array([unit[a] @ unit[o] / temperature for o in others])
            positive = [k for k, o in enumerate(others) if pair_id[o] == pair_id[a]][0]
            total += -(logits[positive] - np.log(np.exp(logits).sum()))
    return total, len(image_rows) + len(text_rows)


def test_contrastive_loss_equals_numpy_info_nce():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(7, 5)).astype(np.float32)
    # Rows 0-2 images of personas 4, 9, 2; rows 3-5 their descriptions shuffled; row 6 is a
    # study row outside the loss.
    pair_id = np.array([4, 9, 2, 2, 4, 9, -1])
    is_image = np.array([True, True, True, False, False, False, True])
    total, anchors = losses.contrastive_loss_sums(jnp.asarray(states), jnp.asarray(pair_id),
                                                  jnp.asarray(is_image), 0.1)
    expected_total, expected_anchors = numpy_info_nce(states, pair_id, is_image, 0.1)
    assert float(anchors) == expected_anchors == 6
    np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)


def test_contrastive_loss_is_low_when_pairs_coincide_and_high_when_crossed():
    directions = np.eye(4, dtype=np.float32) * 3  # Four personas, far apart.
    states = np.concatenate([directions, directions])  # Images, then their descriptions.
    pair_id = np.array([0, 1, 2, 3] * 2)
    is_image = np.array([True] * 4 + [False] * 4)

    def mean_loss(states, pair_id):
        total, anchors = losses.contrastive_loss_sums(jnp.asarray(states), jnp.asarray(pair_id),
                                                      jnp.asarray(is_image), 0.1)
        return float(total / anchors)

    aligned = mean_loss(states, pair_id)
    assert aligned < 1e-3  # Positives coincide, negatives orthogonal: near zero.
    crossed = mean_loss(states, np.array([0, 1, 2, 3, 1, 0, 3, 2]))  # Wrong partners.
    assert crossed > 5
    random_states = np.random.default_rng(1).normal(size=states.shape).astype(np.float32)
    assert aligned < mean_loss(random_states, pair_id) < crossed
    # A row whose partner is not in the batch is no anchor; its loss is finite.
    total, anchors = losses.contrastive_loss_sums(
        jnp.asarray(states), jnp.asarray(np.array([0, 1, 2, 3, 0, 1, 2, 7])),
        jnp.asarray(is_image), 0.1)
    assert float(anchors) == 6 and np.isfinite(float(total))


def test_contrastive_loss_config_names_the_bad_field():
    with pytest.raises(ValueError, match="temperature=0"):
        losses.Contrastive(weight=1.0, temperature=0.0, layer=3)
    with pytest.raises(ValueError, match="layer=0"):
        losses.Contrastive(weight=1.0, temperature=0.1, layer=0)
    config = mitigation_config.get_config("quick")
    config.mitigation.contrastive.layer = 2  # Frozen in fine-tuning (freeze_layers=2).
    with pytest.raises(ValueError, match="contrastive.layer=2 must be a trained decoder layer"):
        mitigation.check_config(config)


def test_pairs_share_a_micro_batch_and_a_persona(persona_dataset_dir):
    config = pipeline.default_config()
    config.data_dir = str(persona_dataset_dir)
    config.batch_size, config.image_size, config.max_length = 8, 32, 256
    config.tasks = ("image_to_name split=train personas=0:4",
                    "image_to_name split=train personas=4:8",
                    "description_to_name split=train personas=4:8")
    config.paired_tasks, config.pair_stride = (1, 2), 2  # Two micro-batches, strided.
    iterator = iter(pipeline.build(config))
    pairs = 0
    for _ in range(6):
        batch = next(iterator)
        for first in range(8):
            if batch["pair_id"][first] >= 0 and batch["pair_image"][first]:
                partner = first + 2 if first % 4 < 2 else first - 2
                assert batch["pair_id"][partner] == batch["pair_id"][first]
                assert batch["persona_id"][partner] == batch["persona_id"][first]
                assert not batch["pair_image"][partner] and batch["task_id"][partner] == 2
                pairs += 1
        assert set(batch["task_id"][batch["pair_id"] < 0]) <= {0}
    assert pairs > 0
    # The description task is only ever a partner: as many of its rows as of paired images.
    config.tasks = config.tasks[:2] + ("description_to_name split=train personas=0:8",)
    with pytest.raises(ValueError, match="must cover the same personas"):
        pipeline.build(config)


# Small enough to compile in seconds: 4 decoder layers, the first 2 frozen as in fine-tuning.
TINY = get_model_config("tiny")
MODEL = dataclasses.replace(
    TINY, vision=None,
    text=dataclasses.replace(TINY.text, vocab_size=256, embed_dim=32, mlp_dim=64, num_layers=4,
                             num_heads=4, num_kv_heads=2, head_dim=8, query_pre_attn_scalar=8,
                             sliding_window=16))


def paired_batch(rows=8, length=12, prompt=8):
    """Text rows, answers at [prompt, prompt + 2): rows r and r + 2 (r % 4 < 2) a pair of
    `pair_id` r // 4 * 2 + r % 2, the first member the 'image' one (strided for 2
    micro-batches, as the pipeline places them with pair_stride=2)."""
    rng = np.random.default_rng(0)
    loss_mask = np.zeros((rows, length), np.float32)
    loss_mask[:, prompt:prompt + 2] = 1.0
    index = np.arange(rows)
    return {"tokens": rng.integers(10, 256, (rows, length)).astype(np.int32),
            "input_mask": np.ones((rows, length), np.int32), "loss_mask": loss_mask,
            "pair_id": (index // 4 * 2 + index % 2).astype(np.int32),
            "pair_image": index % 4 < 2}


def test_contrastive_gradient_reaches_the_layers_that_make_the_states():
    model = VLM(MODEL, rngs=nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in paired_batch().items()}

    def contrastive_mean(params):
        _, probes = nnx.merge(nnx.graphdef(model), params).hidden_states(
            batch["tokens"], None, batch["input_mask"].astype(bool), frozen_layers=2,
            probe_positions=jnp.full([8], 7))
        total, anchors = losses.contrastive_loss_sums(probes[2], batch["pair_id"],
                                                      batch["pair_image"], 0.1)
        return total / anchors

    grads = jax.grad(contrastive_mean)(nnx.state(model, nnx.Param))
    per_layer = sum(np.abs(np.asarray(g)).reshape(g.shape[0], -1).sum(1) for g in
                    jax.tree.leaves(nnx.to_pure_dict(grads["language_model"]["layers"])))
    # Layer 3 (index 2) makes the states after layer 3 and trains; the frozen layers 1-2 (run on
    # stop_gradient weights) and layer 4 (after the states) get nothing.
    assert per_layer[2] > 0
    assert per_layer[0] == per_layer[1] == per_layer[3] == 0


@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_adds_the_contrastive_loss_sharded(accum):
    """Through the jitted train step, batch split over 2 devices (and 2 strided micro-batches):
    the contrastive term is logged, changes the trained layer 3 and nothing frozen."""
    config = trainer.default_config()
    config.batch_size = 8
    config.optim.freeze_layers = 2
    config.optim.grad_accum_steps = accum
    config.optim.warmup_steps = 0
    mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    init_fn = trainer.train_state_fn(config, lambda: VLM(MODEL, rngs=nnx.Rngs(0)))
    graphdef, abstract = sharding.abstract_model(init_fn, mesh)
    batch_sharding = NamedSharding(mesh, trainer.batch_partition())

    def one_step(contrastive):
        state = nnx.state(sharding.create_sharded_model(init_fn, mesh))
        step = trainer.make_train_step(graphdef, config, sharding.state_shardings(abstract),
                                       mesh, answer_cap=8, contrastive=contrastive)
        with sharding.use_mesh(mesh):
            batch = trainer.make_global_batch(paired_batch(), batch_sharding, 8)
            state, metrics = step(state, batch, None)
        model = nnx.merge(graphdef, state).model
        layers = nnx.to_pure_dict(nnx.state(model.language_model.layers))
        return {k: float(v) for k, v in jax.device_get(metrics).items()}, layers

    plain_metrics, plain = one_step(None)
    metrics, aligned = one_step(losses.Contrastive(weight=1.0, temperature=0.1, layer=3))
    assert "contrastive_loss" not in plain_metrics
    assert metrics["contrastive_anchors"] == 8  # Every row's partner is in its micro-batch.
    assert metrics["contrastive_loss"] > 0
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"] + metrics["contrastive_loss"],
                                            rel=1e-4)

    def per_layer_change(layers):
        return sum(np.abs(np.asarray(a) - np.asarray(b)).reshape(a.shape[0], -1).sum(1)
                   for a, b in zip(jax.tree.leaves(layers), jax.tree.leaves(plain)))

    change = per_layer_change(aligned)
    assert change[2] > 0 and change[0] == change[1] == 0
    with pytest.raises(ValueError, match="layer=2 is at or below optim.freeze_layers=2"):
        trainer.make_train_step(graphdef, config, sharding.state_shardings(abstract), mesh,
                                contrastive=losses.Contrastive(1.0, 0.1, 2))
