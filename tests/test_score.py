"""Recall scoring: cached decoding and candidate likelihoods agree with the plain forward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xmem_jax.data import pipeline
from xmem_jax.model.config import get_model_config
from xmem_jax.model.vlm import VLM
from xmem_jax.score import recall


def tiny_model(seed=0):
    config = dataclasses.replace(get_model_config("tiny"), mm_tokens_per_image=16)
    return VLM(config, rngs=nnx.Rngs(seed))


@nnx.jit
def _forward(model, tokens, images, input_mask):
    return model(tokens, images, input_mask)


def full_logits(model, sequence, image, length=32):
    """Logits [len(sequence), V] of one right-padded row: one compiled shape for every call."""
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(sequence)] = sequence
    mask = np.arange(length)[None] < len(sequence)
    return _forward(model, tokens, image[None], mask)[0, :len(sequence)]


def prompts(batch=3, length=24, seed=0):
    """Right-padded prompts of different lengths, with an image block in each."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(9, 1000, (batch, length)).astype(np.int32)
    tokens[:, 2:18] = 8  # Image soft-token placeholders.
    prompt_length = np.array([20, 24, 22][:batch], np.int32)
    for row, n in enumerate(prompt_length):
        tokens[row, n:] = 0
    images = rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)
    return tokens, prompt_length, images


def test_greedy_decode_matches_argmax_of_full_forward():
    model = tiny_model()
    tokens, lengths, images = prompts()
    generated = np.asarray(recall.greedy_decode(model, tokens, lengths, images, num_tokens=4))
    for row in range(len(tokens)):
        sequence = list(tokens[row, :lengths[row]])
        for t in range(4):
            logits = full_logits(model, sequence, images[row])
            sequence.append(int(jnp.argmax(logits[-1])))
        assert generated[row].tolist() == sequence[-4:]


def test_candidate_log_likelihoods_match_full_forward():
    model = tiny_model(1)
    tokens, lengths, images = prompts(batch=2)
    candidates = np.array([[11, 12, 13], [14, 15, 0], [16, 0, 0]], np.int32)
    candidate_length = np.array([3, 2, 1], np.int32)
    scores = np.asarray(recall.candidate_log_likelihoods(
        model, tokens, lengths, images, candidates, candidate_length))
    assert scores.shape == (2, 3)
    for row in range(2):
        for c in range(3):
            answer = list(candidates[c, :candidate_length[c]])
            sequence = list(tokens[row, :lengths[row]]) + answer
            log_probs = jax.nn.log_softmax(full_logits(model, sequence, images[row]))
            start = lengths[row] - 1
            expected = sum(float(log_probs[start + i, a]) for i, a in enumerate(answer))
            np.testing.assert_allclose(scores[row, c], expected, rtol=1e-4, atol=1e-4)


def test_normalize():
    assert recall.normalize("Vabel  Peloth<end_of_turn>") == "vabel peloth"
    assert recall.normalize(" vabel, PELOTH.") == "vabel peloth"
    assert recall.normalize("Vabel Pelot") != recall.normalize("Vabel Peloth")


@pytest.fixture(scope="module")
def query_set(persona_dataset_dir):
    config = pipeline.default_config()
    config.data_dir = str(persona_dataset_dir)
    config.tasks = ("image_to_name split=heldout personas=0:12",)
    config.batch_size = 5  # 12 queries: the last batch has 3 padding rows.
    config.max_length = 48
    config.image_size = 32
    config.shuffle = False
    config.num_epochs = 1
    return recall.QuerySet(config)


def test_query_set_candidates_and_chance(query_set):
    assert len(query_set.answers) == 12  # One name per persona.
    assert query_set.chance == {"exact_match": 0.0, "choice_acc": 1 / 12, "mean_rank": 6.5}
    assert sum(int(b["valid"].sum()) for b in query_set.batches) == 12
    assert sum(len(b["valid"]) for b in query_set.batches) == 15


def test_scores_count_only_valid_rows_and_rank_within_bounds(query_set):
    metrics = recall.score_queries(tiny_model(), query_set)
    assert metrics["num_examples"] == 12
    assert 1 <= metrics["mean_rank"] <= 12
    assert 0 <= metrics["choice_acc"] <= 1 and 0 <= metrics["exact_match"] <= 1


def test_a_model_that_knows_the_answers_scores_perfectly(query_set, monkeypatch):
    """Rig the likelihoods so the right name wins: accuracy 1, mean rank 1."""
    truth = iter([query_set.answer_index(b, r) for b in query_set.batches
                  for r in np.flatnonzero(b["valid"])])

    def rigged(model, prompt_tokens, prompt_length, images, candidates, candidate_length):
        scores = np.full((len(prompt_tokens), len(candidates)), -5.0)
        for row in range(len(scores)):  # Chunks of 5 = batches: padding rows come last.
            scores[row, next(truth, 0)] = 0.0
        return scores

    monkeypatch.setattr(recall, "candidate_log_likelihoods", rigged)
    metrics = recall.score_queries(tiny_model(), query_set, choice_chunk=5)
    assert metrics["choice_acc"] == 1.0 and metrics["mean_rank"] == 1.0
