"""Recall scoring, jitted and batched: greedy exact match and candidate choice.

For a set of queries (prompt-mode batches of the input pipeline):
  * exact match: greedy decoding with the KV cache, compared with the reference answer after
    normalisation (case, punctuation, spaces);
  * choice: the log-likelihood of every candidate answer (the distinct answers of the query set,
    e.g. every study persona's name) given the prompt, summed over the candidate's tokens (not
    length-normalised: names differ little in length and the sum is the model's probability of
    the whole answer); accuracy of the argmax and the mean rank of the right answer (1 = best).

Both share one prefill per query: candidates are scored by decoding their tokens from copies of
the prompt's cache, so a query with C candidates costs one prompt pass plus C short decodes
rather than C full passes.
"""

from __future__ import annotations

import re
import string
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from xmem_jax.data import pipeline
from xmem_jax.data.tokenizer import END_OF_TURN

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.replace(END_OF_TURN, "")).lower().split())


def _repeat_cache(cache, times: int):
    """Each row's cache `times` times over: [B, ...] -> [B * times, ...] (row-major)."""
    return type(cache)(
        k=jnp.repeat(cache.k, times, axis=1), v=jnp.repeat(cache.v, times, axis=1),
        kv_mask=jnp.repeat(cache.kv_mask, times, axis=0), end_index=cache.end_index,
        next_position=jnp.repeat(cache.next_position, times, axis=0))


def _prefill(model, prompt_tokens, prompt_length, images, extra_slots: int):
    input_mask = jnp.arange(prompt_tokens.shape[1])[None] < prompt_length[:, None]
    images = images if model.config.vision is not None else None
    logits, cache = model.prefill(prompt_tokens, images, input_mask,
                                  cache_size=prompt_tokens.shape[1] + extra_slots)
    last = jnp.take_along_axis(logits, (prompt_length - 1)[:, None, None], axis=1)[:, 0]
    return jax.nn.log_softmax(last), cache


@nnx.jit(static_argnames=("num_tokens",))
def greedy_decode(model, prompt_tokens, prompt_length, images, *, num_tokens: int):
    """[B, num_tokens] greedy continuations (after <end_of_turn>, tokens are meaningless)."""
    log_probs, cache = _prefill(model, prompt_tokens, prompt_length, images, num_tokens)
    token = jnp.argmax(log_probs, axis=-1)
    out = [token]
    for _ in range(num_tokens - 1):  # Short answers: unrolled steps compile once per length.
        logits, cache = model.decode_step(token, cache)
        token = jnp.argmax(logits, axis=-1)
        out.append(token)
    return jnp.stack(out, axis=1)


@nnx.jit
def candidate_log_likelihoods(model, prompt_tokens, prompt_length, images, candidates,
                              candidate_length):
    """[B, C] sum of log p(candidate tokens | prompt); candidates [C, La] padded."""
    num_candidates, length = candidates.shape
    log_probs, cache = _prefill(model, prompt_tokens, prompt_length, images, length)
    batch = prompt_tokens.shape[0]
    total = log_probs[:, candidates[:, 0]]  # [B, C]
    cache = _repeat_cache(cache, num_candidates)
    tokens = jnp.tile(candidates, (batch, 1))  # Row b * C + c is candidate c of query b.
    lengths = jnp.tile(candidate_length, batch)
    for t in range(length - 1):
        logits, cache = model.decode_step(tokens[:, t], cache)
        step = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, t + 1:t + 2], axis=1)
        total += jnp.where(t + 1 < lengths, step[:, 0], 0.0).reshape(batch, num_candidates)
    return total


class QuerySet:
    """The prompt-mode batches of one task, loaded once, with their candidate answers."""

    def __init__(self, pipeline_config: ml_collections.ConfigDict):
        built = pipeline.build(pipeline_config, mode="prompt")
        self.tokenizer = built.tokenizer
        self.batches = [{k: np.asarray(v) for k, v in b.items()} for b in built.dataset]
        answers = {}
        for batch in self.batches:
            for row in np.flatnonzero(batch["valid"]):
                answer = batch["answer_tokens"][row, :batch["answer_length"][row]]
                answers.setdefault(tuple(answer.tolist()), len(answers))
        self.answers = list(answers)
        length = max(len(a) for a in self.answers)
        self.candidates = np.zeros((len(self.answers), length), np.int32)
        for i, answer in enumerate(self.answers):
            self.candidates[i, :len(answer)] = answer
        self.candidate_length = np.array([len(a) for a in self.answers], np.int32)
        self._index = answers

    @property
    def chance(self) -> dict[str, float]:
        count = len(self.answers)
        return {"exact_match": 0.0, "choice_acc": 1.0 / count, "mean_rank": (count + 1) / 2}

    def answer_index(self, batch: Mapping[str, np.ndarray], row: int) -> int:
        answer = batch["answer_tokens"][row, :batch["answer_length"][row]]
        return self._index[tuple(answer.tolist())]


def score_queries(model: nnx.Module, queries: QuerySet, choice_chunk: int = 8) -> dict:
    """{"exact_match", "choice_acc", "mean_rank", "num_examples"} over the valid queries."""
    exact, correct, ranks = [], [], []
    num_tokens = queries.candidates.shape[1]
    for batch in queries.batches:
        inputs = [batch[k] for k in ("prompt_tokens", "prompt_length", "images")]
        generated = np.asarray(greedy_decode(model, *inputs, num_tokens=num_tokens))
        valid = np.flatnonzero(batch["valid"])
        for row in valid:
            reference = batch["answer_tokens"][row, :batch["answer_length"][row]]
            exact.append(normalize(queries.tokenizer.decode(generated[row]).split(END_OF_TURN)[0])
                         == normalize(queries.tokenizer.decode(reference)))
        for start in range(0, len(batch["valid"]), choice_chunk):
            rows = slice(start, start + choice_chunk)
            scores = np.asarray(candidate_log_likelihoods(
                model, *[x[rows] for x in inputs], queries.candidates, queries.candidate_length))
            for offset, row_scores in enumerate(scores):
                row = start + offset
                if not batch["valid"][row]:
                    continue
                target = queries.answer_index(batch, row)
                rank = 1 + int(np.sum(row_scores > row_scores[target]))
                ranks.append(rank)
                correct.append(rank == 1)
    return {"exact_match": float(np.mean(exact)), "choice_acc": float(np.mean(correct)),
            "mean_rank": float(np.mean(ranks)), "num_examples": len(ranks)}


class Scorer:
    """`scorer(model, step) -> {name: metrics}`: the trainer's periodic evaluation hook."""

    def __init__(self, pipeline_configs: Mapping[str, ml_collections.ConfigDict]):
        self.query_sets = {name: QuerySet(c) for name, c in pipeline_configs.items()}

    def __call__(self, model: nnx.Module, step: int) -> dict:
        del step
        return {name: score_queries(model, queries) for name, queries in self.query_sets.items()}
