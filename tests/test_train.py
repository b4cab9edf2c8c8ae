"""Training: the answer-only loss, the optimizer (schedule, decay mask, freezing, accumulation),
sharded steps, NaN stops, resuming (data stream included) and checkpoint errors."""

import dataclasses
import itertools
import json
import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from xmem_jax.data import pipeline
from xmem_jax.model import VLM, get_model_config
from xmem_jax.train import checkpoints, losses, optim, sharding, trainer

TINY = get_model_config("tiny")
# Smaller than `tiny` so that a train step compiles in seconds; still shards on (2, 2, 2). The
# vocabulary covers the test dataset's tokenizer (600 ids).
MODEL = dataclasses.replace(
    TINY, mm_tokens_per_image=4,
    vision=dataclasses.replace(TINY.vision, width=32, depth=1, mlp_dim=64, num_heads=2),
    text=dataclasses.replace(TINY.text, vocab_size=640, embed_dim=32, mlp_dim=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, query_pre_attn_scalar=8,
                             sliding_window=16))
BATCH, LENGTH, BOS = 8, 48, 2  # LENGTH = the pipeline tests' max_length.


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Shares compiled programs between this module's tests: most run the same train step on the
    same mesh, and each compile takes seconds on a small CPU."""
    from jax.experimental.compilation_cache import compilation_cache as cache

    options = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
               "jax_persistent_cache_min_compile_time_secs": 0.0}
    previous = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    cache.reset_cache()


def model_fn(config=MODEL):
    return lambda: VLM(config, rngs=nnx.Rngs(0))


def make_batch(seed, batch=BATCH, length=LENGTH, images=True):
    """A train batch as the pipeline makes it: <bos>, an image's placeholders (on rows with an
    image: 3 in 4 rows, none without `images`), prompt text, the answer, then padding; answers
    of varying length."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, length), np.int32)
    input_mask = np.zeros((batch, length), np.int32)
    loss_mask = np.zeros((batch, length), np.float32)
    has_image = (np.arange(batch) % 4 != 3) & images
    for row in range(batch):
        image = [MODEL.image_token_id] * MODEL.mm_tokens_per_image if has_image[row] else []
        prompt = [BOS, *image, *rng.integers(9, MODEL.text.vocab_size, rng.integers(3, 8))]
        answer = list(rng.integers(9, MODEL.text.vocab_size, rng.integers(1, 6)))
        end = len(prompt) + len(answer)
        tokens[row, :end] = prompt + answer
        input_mask[row, :end] = 1
        loss_mask[row, len(prompt):end] = 1
    size = MODEL.vision.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    images[~has_image] = 0
    return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask,
            "images": images, "has_image": has_image}


def train_config(num_steps=6):
    """The loop tests share this config (and so one compiled step on the default mesh)."""
    config = trainer.default_config()
    config.num_steps = num_steps
    config.batch_size = BATCH
    config.log_every = 1
    config.progress_bar = False
    config.optim.learning_rate = 1e-2
    config.optim.warmup_steps = 0
    config.checkpoint.every_steps = 2
    config.checkpoint.max_to_keep = 5
    return config


def one_device_mesh(data=1):
    return sharding.make_mesh(data, 1, 1, devices=jax.devices()[:data])


def run_steps(config, mesh, batches, model_config=MODEL, answer_cap=None):
    """Builds the train state on `mesh`, runs one jitted step per batch; returns the initial
    params, the final model and each step's metrics."""
    init_fn = trainer.train_state_fn(config, model_fn(model_config))
    graphdef, abstract = sharding.abstract_model(init_fn, mesh)
    state = nnx.state(sharding.create_sharded_model(init_fn, mesh))
    initial = params_of(nnx.merge(graphdef, state).model)
    step = trainer.make_train_step(graphdef, config, sharding.state_shardings(abstract), mesh,
                                   answer_cap=answer_cap)
    batch_sharding = NamedSharding(mesh, trainer.batch_partition())
    history = []
    with sharding.use_mesh(mesh):
        for batch in batches:
            global_batch = trainer.make_global_batch(batch, batch_sharding, config.batch_size)
            state, metrics = step(state, global_batch, None)
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return initial, nnx.merge(graphdef, state).model, history


def params_of(model):
    return {"/".join(map(str, path)): np.asarray(v[...])
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# -- Loss. ------------------------------------------------------------------------------------


def test_loss_counts_only_answer_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 6)).astype(np.int32)
    loss_mask = np.array([[1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = [(0, 3), (0, 4), (1, 5)]  # (row, t) with loss_mask[t] = 1 and t > 0.
    expected = -np.mean([log_probs[b, t - 1, tokens[b, t]] for b, t in targets])
    loss, count = losses.next_token_loss(logits, tokens, loss_mask)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert count == 3  # loss_mask[0, 0] has no predicting position.

    # Logits at positions that predict a non-answer token do not matter.
    unused = logits.copy()
    unused[0, [0, 1, 4, 5]] = 100.0
    unused[1, :4] = -50.0
    np.testing.assert_allclose(losses.next_token_loss(unused, tokens, loss_mask)[0], loss,
                               rtol=1e-6)
    assert losses.next_token_loss(logits, tokens, np.zeros_like(loss_mask))[0] == 0.0


def full_and_lean_losses(objective=None, cap=None, chunk_logits=losses.CHUNK_LOGITS,
                         images=True):
    """The loss and its gradient, from full [B, L, V] logits and from the train step's lean
    path (`answer_positions`, gathered hidden states, chunked head), on one batch."""
    batch = make_batch(0)
    forget = np.arange(BATCH) % 2 == 0
    tokens, mask = batch["tokens"], batch["input_mask"].astype(bool)
    inputs = (tokens, batch["images"] if images else None, mask)
    reference = VLM(MODEL, rngs=nnx.Rngs(1)) if objective and objective.needs_reference else None

    def full(model, reference):
        logits = model(*inputs)
        if objective is None:
            total, count = losses.next_token_loss_sums(logits, tokens, batch["loss_mask"])
        else:
            total, count = losses.unlearning_loss_sums(
                objective, logits, tokens, batch["loss_mask"], forget,
                None if reference is None else reference(*inputs))
        return total / count

    def lean(model, reference):
        answers = losses.answer_positions(tokens, batch["loss_mask"], cap)
        hidden = losses.gather_positions(model.hidden_states(*inputs), answers.index)
        reference_args = () if reference is None else (
            reference.language_model.logits,
            losses.gather_positions(reference.hidden_states(*inputs), answers.index))
        token_losses = losses.answer_token_losses(model.language_model.logits, hidden,
                                                  answers.targets, *reference_args,
                                                  chunk_logits=chunk_logits)
        if objective is None:
            total, count = losses.token_loss_sums(token_losses.nll, answers.weights)
        else:
            total, count = losses.objective_loss_sums(objective, token_losses,
                                                      answers.weights, forget)
        return total / count

    model = VLM(MODEL, rngs=nnx.Rngs(0))
    return [nnx.jit(nnx.value_and_grad(fn))(model, reference) for fn in (full, lean)]


def assert_same_loss_and_grads(results):
    (loss, grads), (lean_loss, lean_grads) = results
    np.testing.assert_allclose(lean_loss, loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 lean_grads, grads)


@pytest.mark.parametrize("cap, chunk_logits", [
    (None, losses.CHUNK_LOGITS),  # Every position, one chunk.
    (5, losses.CHUNK_LOGITS),  # The longest answer: answer positions only.
    (8, BATCH * MODEL.text.vocab_size * 3),  # Chunks of 3 positions, the last one padded.
])
def test_lean_loss_equals_full_logits(cap, chunk_logits):
    assert_same_loss_and_grads(full_and_lean_losses(cap=cap, chunk_logits=chunk_logits))


@pytest.mark.parametrize("name", losses.UNLEARNING_METHODS)
def test_lean_unlearning_objectives_equal_full_logits(name):
    assert_same_loss_and_grads(full_and_lean_losses(
        losses.Objective(name), cap=5, chunk_logits=BATCH * MODEL.text.vocab_size * 2))


def test_answer_positions_in_order_then_unused_slots():
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    loss_mask = np.array([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]], np.float32)
    answers = losses.answer_positions(tokens, loss_mask, 3)
    np.testing.assert_array_equal(answers.index[:, :2], [[1, 2], [4, 0]])
    np.testing.assert_array_equal(answers.targets[0, :2], [2, 3])
    np.testing.assert_array_equal(answers.weights, [[1, 1, 0], [1, 0, 0]])


def test_answer_cap_per_batch_or_fixed():
    assert [trainer.choose_answer_cap(n, 0) for n in (0, 5, 8, 9, 70)] == [8, 8, 8, 16, 128]
    assert trainer.choose_answer_cap(5, 12) == 12
    with pytest.raises(ValueError, match="13 answer tokens but max_answer_tokens=12"):
        trainer.choose_answer_cap(13, 12)


def test_train_step_loss_is_the_full_logits_loss():
    """The step reads the head at the per-batch cap of answer positions only."""
    batch = make_batch(0)
    cap = trainer.choose_answer_cap(trainer.batch_facts(batch)[0], 0)
    assert cap < LENGTH - 1
    initial, _, history = run_steps(train_config(), one_device_mesh(), [batch], answer_cap=cap)
    model = VLM(MODEL, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.State.from_flat_path(
        [(tuple(path.split("/")), value) for path, value in initial.items()]))
    logits = model(batch["tokens"], batch["images"], batch["input_mask"].astype(bool))
    loss, _ = losses.next_token_loss(logits, batch["tokens"], batch["loss_mask"])
    np.testing.assert_allclose(history[0]["loss"], loss, rtol=1e-5)


def test_text_only_batch_skips_the_tower_with_the_same_step():
    """A batch without image rows trains the same without `images` (the trainer drops them,
    and the tower does not run) as with zero images through the tower."""
    batch = make_batch(0, images=False)
    assert not trainer.batch_facts(batch)[1]
    without_images = {key: value for key, value in batch.items() if key != "images"}
    (_, with_tower, tower_history), (_, skipped, skipped_history) = (
        run_steps(train_config(), one_device_mesh(), [b]) for b in (batch, without_images))
    np.testing.assert_allclose(skipped_history[0]["loss"], tower_history[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(skipped_history[0]["grad_norm"], tower_history[0]["grad_norm"],
                               rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 params_of(skipped), params_of(with_tower))


# -- Optimizer. -------------------------------------------------------------------------------


def test_schedule_warms_up_then_decays():
    config = optim.default_config()
    config.update(learning_rate=1.0, warmup_steps=10, end_learning_rate_factor=0.1)
    cosine = optim.learning_rate_schedule(config, num_steps=110)
    np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    config.schedule = "linear"
    linear = optim.learning_rate_schedule(config, num_steps=110)
    np.testing.assert_allclose([linear(35), linear(110)], [0.775, 0.1], atol=1e-6)
    config.schedule = "exponential"
    with pytest.raises(ValueError, match="schedule='exponential'.*cosine, linear, constant"):
        optim.make_optimizer(config, num_steps=110)


def test_weight_decay_spares_norms_biases_and_embeddings():
    params = nnx.state(nnx.eval_shape(model_fn()), nnx.Param)
    mask = optim.decay_mask(optim.default_config())(params)
    decayed = {optim.path_name(path): value
               for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert decayed["language_model/layers/mlp/up_proj/kernel"]
    assert decayed["vision_tower/encoder/layers/self_attn/q_proj/kernel"]
    for name in ("language_model/embed_tokens/embedding", "language_model/norm/scale",
                 "language_model/layers/self_attn/q_norm/scale",
                 "vision_tower/embeddings/position_embedding",
                 "vision_tower/encoder/layers/mlp/fc1/bias", "vision_tower/post_layernorm/scale"):
        assert not decayed[name], name


def test_freeze_regex_leaves_frozen_params_unchanged():
    config = train_config()
    config.optim.freeze_regex = "^vision_tower/"
    model = nnx.eval_shape(model_fn())
    assert "frozen by freeze_regex" in optim.describe_trainable(model, config.optim)
    before, after, _ = run_steps(config, one_device_mesh(), [make_batch(0), make_batch(1)])
    for name, value in params_of(after).items():
        if name.startswith("vision_tower/"):
            np.testing.assert_array_equal(value, before[name], err_msg=name)
        else:
            assert not np.array_equal(value, before[name]), f"{name} did not train"
    config.optim.freeze_regex = "."
    with pytest.raises(ValueError, match="freezes every parameter"):
        optim.describe_trainable(model, config.optim)


def test_freeze_layers_leaves_the_first_decoder_layers_unchanged():
    config = train_config()
    config.optim.freeze_layers = 1
    before, after, _ = run_steps(config, one_device_mesh(), [make_batch(0), make_batch(1)])
    for name, value in params_of(after).items():
        if name.startswith("language_model/layers/"):
            np.testing.assert_array_equal(value[:1], before[name][:1], err_msg=name)
            assert not np.array_equal(value[1:], before[name][1:]), f"{name} did not train"
        else:
            assert not np.array_equal(value, before[name]), f"{name} did not train"


def test_grad_accumulation_matches_one_big_batch():
    """4 micro-batches of 2 rows (with different answer-token counts) = one batch of 8: the loss
    is a mean over all answer tokens, not a mean of micro-batch means."""
    batches = [make_batch(0), make_batch(1)]
    config = train_config()
    # eps=1 makes Adam's first updates ~ lr * gradient: with the default eps, float noise in
    # gradients that are zero in exact arithmetic (e.g. key biases) would become +-lr steps.
    config.optim.eps = 1.0
    mesh = one_device_mesh(data=2)
    _, big, big_history = run_steps(config, mesh, batches)
    config.optim.grad_accum_steps = 4
    _, accumulated, accumulated_history = run_steps(config, mesh, batches)
    for key in ("loss", "grad_norm", "loss_tokens"):
        np.testing.assert_allclose([m[key] for m in accumulated_history],
                                   [m[key] for m in big_history], rtol=2e-5, err_msg=key)
    expected = params_of(big)
    for name, value in params_of(accumulated).items():
        np.testing.assert_allclose(value, expected[name], atol=2e-5, err_msg=name)


@pytest.fixture(scope="module")
def one_device_history():
    return run_steps(train_config(), one_device_mesh(), [make_batch(seed) for seed in range(3)])[2]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_training_matches_one_device(mesh_shape, one_device_history):
    batches = [make_batch(seed) for seed in range(3)]
    _, model, history = run_steps(train_config(), sharding.make_mesh(*mesh_shape), batches)
    expected = one_device_history
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in history], [m[key] for m in expected],
                                   rtol=2e-5, err_msg=key)
    embedding = model.language_model.embed_tokens.embedding[...]
    assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


# -- Config errors. ---------------------------------------------------------------------------


def test_batch_size_not_divisible_by_batch_devices(tmp_path):
    config = train_config()
    config.batch_size = 6  # 8 data-parallel devices.
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by grad_accum_steps=1 x "
                                         r"the 8 devices .*Use a multiple of 8"):
        trainer.train(config, tmp_path, model_fn(), iter([]))
    config.batch_size, config.mesh.data, config.mesh.fsdp = 12, 2, 2  # 4 batch shards x 2.
    config.mesh.tensor = 2
    config.optim.grad_accum_steps = 2
    with pytest.raises(ValueError, match="grad_accum_steps=2 x the 4 devices"):
        trainer.train(config, tmp_path, model_fn(), iter([]))


def test_per_host_rows_must_match_batch_size():
    mesh = one_device_mesh()
    with pytest.raises(ValueError, match="'tokens' has 4 rows.*batch_size=8 needs 8 per host"):
        trainer.make_global_batch(make_batch(0, batch=4),
                                  NamedSharding(mesh, trainer.batch_partition()), 8)


def test_rows_pad_to_the_widest_process_width():
    batch = make_batch(0, length=40)
    longest, any_image, width = trainer.batch_layout(batch)
    assert width == 40 and any_image and longest == int(batch["loss_mask"][:, 1:].sum(1).max())
    padded = trainer.pad_width(batch, 48)
    for key in ("tokens", "input_mask", "loss_mask"):
        assert padded[key].shape == (BATCH, 48) and not padded[key][:, 40:].any()
        np.testing.assert_array_equal(padded[key][:, :40], batch[key])
    assert padded["images"] is batch["images"] and trainer.pad_width(batch, 40) is batch


def test_iterator_state_restores_under_another_process_count(tmp_path, data_config):
    """A checkpoint saved by 2 processes holds one iterator state per process, all equal (they
    count global batches): a run with another process count takes that state."""
    iterator = pipeline_iter(data_config)
    for _ in range(3):
        next(iterator)
    config = checkpoints.default_config()
    checkpointer = checkpoints.Checkpointer(tmp_path, config)
    checkpointer.save(3, {"w": np.arange(2.0)}, iterator)
    checkpointer.wait_until_finished()
    expected = [next(iterator) for _ in range(2)]
    data = tmp_path / "3" / "data"
    state = (data / "process_0-of-1.json").read_text()
    (data / "process_0-of-1.json").unlink()
    for k in range(2):  # As 2 processes leave it.
        (data / f"process_{k}-of-2.json").write_text(state)
    resumed = pipeline_iter(data_config)
    step, restored = checkpointer.restore({"w": np.zeros(2)}, resumed)
    assert step == 3 and restored["w"].tolist() == [0.0, 1.0]
    for got, want in zip([next(resumed) for _ in range(2)], expected):
        np.testing.assert_array_equal(got["example_id"], want["example_id"])
    (data / "process_1-of-2.json").write_text(state.replace("3", "4"))
    with pytest.raises(RuntimeError, match=r"holds no iterator state for process 0 of 1, and "
                                           r"the 2 saved ones .* differ"):
        checkpointer.restore({"w": np.zeros(2)}, pipeline_iter(data_config))
    checkpointer.close()


def test_model_that_does_not_divide_the_mesh(tmp_path):
    config = train_config()
    config.mesh.data, config.mesh.tensor = 1, 8  # 2 KV heads.
    with pytest.raises(ValueError, match=r"k_proj/kernel dim 2 \(size 2.*tensor"):
        trainer.train(config, tmp_path, model_fn(), iter([]))
    config.mesh.data, config.mesh.tensor = -1, 3
    with pytest.raises(ValueError, match="8 devices do not split into groups of 3"):
        trainer.train(config, tmp_path, model_fn(), iter([]))


# -- The loop: NaN stops, resuming, checkpoint errors. ----------------------------------------


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = train_config()

    def batches():
        for i in itertools.count():
            batch = make_batch(i)
            if i == 4:  # The batch of step 5.
                batch["images"][:] = np.nan
            yield batch

    with pytest.raises(FloatingPointError,
                       match=r"Step 5: loss=nan.*last good checkpoint is step 4"):
        trainer.train(config, tmp_path, model_fn(), batches())
    checkpointer = checkpoints.Checkpointer(tmp_path / "checkpoints", config.checkpoint)
    assert checkpointer.latest_step == 4
    _, abstract = sharding.abstract_model(trainer.train_state_fn(config, model_fn()),
                                          one_device_mesh())
    step, state = checkpointer.restore(abstract)
    assert step == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def data_config(persona_dataset_dir):
    config = pipeline.default_config()
    config.data_dir = str(persona_dataset_dir)
    config.tasks = ["image_to_name"]
    config.batch_size = BATCH
    config.max_length = 48
    config.image_size = MODEL.vision.image_size
    config.num_image_tokens = MODEL.mm_tokens_per_image
    return config


def pipeline_iter(data_config):
    return iter(pipeline.build(data_config, process_index=0, process_count=1))


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(tmp_path, data_config):
    """Cut off after step 3 (checkpoint at 2), rerun: same final params and metrics as one
    uninterrupted run, so the data stream resumed at the right batch."""
    config = train_config()
    full = trainer.train(config, tmp_path / "full", model_fn(), pipeline_iter(data_config))

    def interrupt(model, step):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        trainer.train(config, tmp_path / "cut", model_fn(), pipeline_iter(data_config),
                      eval_fn=interrupt, eval_every=1)
    resumed = trainer.train(config, tmp_path / "cut", model_fn(), pipeline_iter(data_config))

    assert resumed.step == full.step == 6
    for key in ("loss", "grad_norm", "learning_rate", "loss_tokens", "tokens"):
        assert resumed.metrics[key] == full.metrics[key], key
    expected = params_of(full.model)
    for name, value in params_of(resumed.model).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)

    def history(workdir):
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [(row["step"], row["loss"], row["grad_norm"]) for row in rows]

    assert history(tmp_path / "cut") == history(tmp_path / "full")


def test_each_evaluation_is_logged_with_its_wall_time(tmp_path, data_config):
    """Evaluation rows carry `eval_seconds`, the time `eval_fn` took, which
    study.scoring_seconds summarises; the curves read back only the named results."""
    import time

    from xmem_jax.experiments import study

    def slow_eval(model, step):
        time.sleep(0.05 if step else 0.2)  # The first stands in for compiling.
        return {"image": {"choice_acc": step / 10}}

    trainer.train(train_config(), tmp_path / "run", model_fn(), pipeline_iter(data_config),
                  eval_fn=slow_eval, eval_every=3)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines() if json.loads(line)["kind"] == "eval"]
    assert [row["step"] for row in rows] == [0, 3, 6]
    assert rows[0]["eval_seconds"] >= 0.2 and all(r["eval_seconds"] >= 0.05 for r in rows)
    timing = study.scoring_seconds([tmp_path / "run"])
    assert timing["evaluations"] == 3 and timing["first_s"] == rows[0]["eval_seconds"]
    assert timing["per_evaluation_s"] == pytest.approx(
        (rows[1]["eval_seconds"] + rows[2]["eval_seconds"]) / 2)
    assert timing["total_s"] == pytest.approx(sum(r["eval_seconds"] for r in rows))
    assert study.curves_from_log(tmp_path / "run", ["image"]) == [
        {"step": s, "image": {"choice_acc": s / 10}} for s in (0, 3, 6)]


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path, data_config):
    """From pretrained weights with only LoRA adapters trained, a checkpoint stores the adapters
    and the optimizer, not the frozen weights; a cut-off run resumes (the frozen weights come
    from the same initial state) to the uninterrupted run's result."""
    from xmem_jax.model import lora

    def adapted():
        model = VLM(MODEL, rngs=nnx.Rngs(0))
        lora.add_adapters(model, rank=2, alpha=4.0, target_regex=lora.default_config().target_regex)
        return model

    pretrained = adapted()  # Other weights than model_fn's: a stand-in for a checkpoint.
    nnx.update(pretrained, nnx.state(VLM(MODEL, rngs=nnx.Rngs(7))))
    initial = nnx.state(pretrained)
    config = train_config()
    config.optim.freeze_regex = lora.FREEZE_ALL_BUT_ADAPTERS
    full = trainer.train(config, tmp_path / "full", adapted, pipeline_iter(data_config),
                         initial_state=initial)

    def leaf_paths(tree, prefix=()):
        if not hasattr(tree, "items"):
            return [prefix]
        return [p for key, sub in tree.items() for p in leaf_paths(sub, (*prefix, str(key)))]

    checkpointer = checkpoints.Checkpointer(tmp_path / "full" / "checkpoints", config.checkpoint)
    stored = checkpointer._manager.item_metadata(checkpointer.latest_step)["state"]
    checkpointer.close()
    stored_model = [path for path in leaf_paths(stored["model"])]
    assert stored_model and all(any(part.startswith("lora_") for part in path)
                                for path in stored_model), stored_model[:5]

    def interrupt(model, step):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        trainer.train(config, tmp_path / "cut", adapted, pipeline_iter(data_config),
                      eval_fn=interrupt, eval_every=1, initial_state=initial)
    resumed = trainer.train(config, tmp_path / "cut", adapted, pipeline_iter(data_config),
                            initial_state=initial)
    assert params_of(resumed.model)["vision_tower/embeddings/patch_embedding/kernel"].tolist() \
        == params_of(pretrained)["vision_tower/embeddings/patch_embedding/kernel"].tolist()
    expected = params_of(full.model)
    for name, value in params_of(resumed.model).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
    """A finished run with checkpoints at steps 2, 4 and 6."""
    workdir = tmp_path_factory.mktemp("finished")
    trainer.train(train_config(), workdir, model_fn(), (make_batch(i) for i in itertools.count()))
    return workdir


def test_checkpoint_of_another_model_shape_is_a_clear_error(finished_workdir, tmp_path):
    shutil.copytree(finished_workdir, tmp_path, dirs_exist_ok=True)
    wider = dataclasses.replace(MODEL, text=dataclasses.replace(MODEL.text, mlp_dim=128))
    expected = (r"checkpoints/6 does not fit this model: "
                r"model/language_model/layers/mlp/down_proj/kernel has shape \(2, 64, 32\) in "
                r"the checkpoint but \(2, 128, 32\) in the model")
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match=expected):
        trainer.train(train_config(), tmp_path, model_fn(wider), iter([]))


def test_corrupt_latest_checkpoint_falls_back_to_previous(finished_workdir, tmp_path, caplog):
    shutil.copytree(finished_workdir, tmp_path, dirs_exist_ok=True)
    directory = tmp_path / "checkpoints"
    for chunk in (directory / "6" / "state" / "d").iterdir():
        chunk.write_bytes(b"garbage")
    config = train_config()
    _, abstract = sharding.abstract_model(trainer.train_state_fn(config, model_fn()),
                                          one_device_mesh())
    checkpointer = checkpoints.Checkpointer(directory, config.checkpoint)
    with caplog.at_level(logging.WARNING):
        step, _ = checkpointer.restore(abstract)
    assert step == 4
    assert "checkpoints/6 cannot be restored" in caplog.text
    assert (directory / "6.corrupt").is_dir() and checkpointer.latest_step == 4
    checkpointer.close()

    # The run resumes from step 4 and saves step 6 afresh.
    result = trainer.train(config, tmp_path, model_fn(), (make_batch(i) for i in range(4, 9)))
    assert result.step == 6 and (directory / "6" / "state").is_dir()

    for step in ("2", "4", "6"):
        (directory / step / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(RuntimeError, match="No checkpoint in .* could be restored"):
        checkpoints.Checkpointer(directory, config.checkpoint).restore(abstract)
    assert (directory / "6").is_dir()  # Nothing is set aside when nothing restores.


def _event_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files under `directory` (TFRecord-framed Events)."""
    import struct

    from etils import epath
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(epath.Path(directory).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_go_to_tensorboard_as_well_as_jsonl(tmp_path):
    from etils import epath

    log = trainer.MetricsLog(epath.Path(tmp_path) / "metrics.jsonl", resume_step=0)
    log.write({"kind": "train", "step": 5, "loss": 1.5, "tokens_per_s": 900.0})
    log.write({"kind": "eval", "step": 10, "image_to_name": {"choice_acc": 0.25, "n": 4},
               "note": "text is skipped"})
    log.close()
    scalars = _event_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(5, 1.5)]
    assert scalars["train/tokens_per_s"] == [(5, 900.0)]
    assert scalars["eval/image_to_name/choice_acc"] == [(10, 0.25)]
    assert "eval/note" not in scalars and "train/step" not in scalars
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
