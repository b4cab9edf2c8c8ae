"""Jitted, batched decoding with the KV cache: greedy generation and candidate log-likelihoods.

Prompts arrive right-padded (the input pipeline's prompt mode: `prompt_tokens [B, Lp]`,
`prompt_length [B]`). Inside the jitted functions they are moved to the *left* of a bucketed
width W, so every row's last prompt token sits in slot W - 1 and generated token t in slot
W + t for every row. That is what makes the cache exact: the model measures sliding-window
distances in cache slots, and with right padding a short row's padding slots would sit between
its prompt and its continuation (its window would reach fewer tokens than the uncached forward
pass's). RoPE positions count real tokens only (`vlm.positions_from_mask`), so left padding
changes nothing else.

W comes from a small fixed set (`bucket_length`: multiples of 16 up to 128, then powers of two),
so a stream of batches compiles once per bucket used, not once per longest prompt.

  * `greedy_decode`: one prefill, then a `jax.lax.while_loop` of cached decode steps that stops
    when every row has emitted a stop token (`<end_of_turn>` / `<eos>`) or after
    `max_new_tokens`; returns the ids [B, max_new_tokens] (pad after the stop token) and the
    lengths (stop token included).
  * `candidate_log_likelihoods`: sum_i log p(candidate_i | prompt, candidate_<i) for C candidate
    answers per query, from ONE prefill of the prompt. The candidates are packed side by side
    after the prompt in the cache ("tree attention"): chunks of K candidates are fed as one
    extension of K x (Lc - 1) tokens, each token attending to the prompt and to the earlier
    tokens of its own candidate only, at the RoPE positions it would have right after the
    prompt. So the prompt (and its image) is encoded once per query, not once per candidate,
    and its cache is never copied per candidate; see `recall` for the measured alternatives.
  * `score_batch`: both from one shared prefill.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xmem_jax.model.gemma import AttentionMasks, Cache, attention_masks, empty_kv
from xmem_jax.model.vlm import VLM, positions_from_mask

# Prompt widths: multiples of 16 up to 128, then powers of two (at most ~2x padding beyond 128).
DEFAULT_BUCKETS: tuple[int, ...] = tuple(range(16, 129, 16)) + tuple(2**k for k in range(8, 16))

# Candidate tokens fed per chunk (K x (Lc - 1)): large enough to fill the matmuls, small
# enough that the packed block-causal attention (quadratic in the chunk) stays cheap.
DEFAULT_CHUNK_TOKENS = 128


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= `length` (multiples of 16 beyond the largest bucket)."""
    for bucket in sorted(buckets):
        if bucket >= length:
            return int(bucket)
    return int(16 * math.ceil(length / 16))


def left_align(tokens: jax.Array, lengths: jax.Array, pad_id: int
               ) -> tuple[jax.Array, jax.Array]:
    """Right-padded [B, W] rows -> (left-padded [B, W] rows, [B, W] bool mask of real tokens)."""
    width = tokens.shape[1]
    source = jnp.arange(width)[None, :] - (width - lengths)[:, None]
    real = source >= 0
    moved = jnp.take_along_axis(tokens, jnp.maximum(source, 0), axis=1)
    return jnp.where(real, moved, pad_id), real


def prefill(model: VLM, tokens: jax.Array, input_mask: jax.Array, images: jax.Array | None,
            cache_size: int) -> tuple[jax.Array, Cache]:
    """`VLM.prefill` for left-aligned prompts, keeping only the last slot's logits.

    Returns log-probabilities [B, V] of the token after each prompt and the cache. (The LM head
    runs on one position instead of W: with Gemma 3's 262k vocabulary, the full [B, W, V] logits
    would cost more than the rest of the prompt pass.)
    """
    batch, length = tokens.shape
    x, blocks = model.embed_inputs(tokens, images)
    extra = cache_size - length
    kv_mask = jnp.pad(input_mask, ((0, 0), (0, extra)))
    kv_blocks = None if blocks is None else jnp.pad(blocks, ((0, 0), (0, extra)),
                                                     constant_values=-1)
    masks = attention_masks(jnp.arange(length), jnp.arange(cache_size), kv_mask, blocks,
                            kv_blocks, model.config.text.sliding_window)
    hidden, (k, v) = model.language_model(x, positions_from_mask(input_mask), masks,
                                          empty_kv(model.config, batch, cache_size),
                                          cache_index=0)
    cache = Cache(k=k, v=v, kv_mask=kv_mask, end_index=jnp.asarray(length, jnp.int32),
                  next_position=jnp.sum(input_mask, axis=1, dtype=jnp.int32))
    logits = model.language_model.logits(hidden[:, -1:])[:, 0]
    return jax.nn.log_softmax(logits), cache


def _greedy_loop(model: VLM, first_log_probs: jax.Array, cache: Cache, max_new_tokens: int,
                 stop_ids: tuple[int, ...], pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Greedy continuation from a prefilled cache with >= max_new_tokens - 1 free slots."""
    batch = first_log_probs.shape[0]
    stops = jnp.asarray(stop_ids, jnp.int32)
    token = jnp.argmax(first_log_probs, axis=-1).astype(jnp.int32)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, stops)
    length = jnp.ones((batch,), jnp.int32)
    graphdef, state = nnx.split(model)  # jax.lax loops carry arrays, not modules.

    def cond(carry):
        t, done = carry[0], carry[4]
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, state, cache, token, done, length, out = carry
        logits, cache = nnx.merge(graphdef, state).decode_step(token, cache)
        token = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], t, axis=1)
        length = length + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stops)
        return t + 1, state, cache, token, done, length, out

    carry = (jnp.asarray(1, jnp.int32), state, cache, token, done, length, out)
    *_, length, out = jax.lax.while_loop(cond, body, carry)
    return out, length


def _candidate_masks(kv_mask: jax.Array, width: int, chunk: int, feed: int, cache_size: int,
                     sliding_window: int) -> AttentionMasks:
    """Masks [B, chunk * feed, cache_size] for `chunk` candidates of `feed` tokens packed after a
    left-aligned prompt of `width` slots: each token sees the prompt and its own candidate's
    earlier tokens; windows count positions (as if the candidate followed the prompt alone)."""
    n = chunk * feed
    q_cand, q_step = np.divmod(np.arange(n), feed)
    slots = np.arange(cache_size)
    in_prompt = slots < width
    k_cand, k_step = np.divmod(slots - width, feed)
    in_chunk = (slots >= width) & (slots < width + n)
    same = in_chunk[None] & (k_cand[None] == q_cand[:, None]) & (k_step[None] <= q_step[:, None])
    # Distance in positions: prompt slot s is (width - s) positions before the candidate.
    distance = np.where(in_prompt[None], width + q_step[:, None] - slots[None],
                        q_step[:, None] - k_step[None])
    window = jnp.asarray(distance < sliding_window)
    global_ = (jnp.asarray(in_prompt)[None, None] & kv_mask[:, None, :]) | jnp.asarray(same)[None]
    return AttentionMasks(global_=global_, local=global_ & window[None])


def _candidate_loop(model: VLM, first_log_probs: jax.Array, cache: Cache, width: int,
                    candidates: jax.Array, candidate_length: jax.Array, chunk: int
                    ) -> jax.Array:
    """[B, C] log-likelihoods; candidates [B, C, Lc] with C a multiple of `chunk`."""
    batch, num, length = candidates.shape
    first = jnp.take_along_axis(first_log_probs, candidates[:, :, 0], axis=1)  # [B, C]
    total = first
    if length > 1:
        feed = length - 1
        num_chunks = num // chunk
        masks = _candidate_masks(cache.kv_mask, width, chunk, feed, cache.size,
                                 model.config.text.sliding_window)
        positions = cache.next_position[:, None] + jnp.tile(jnp.arange(feed), chunk)[None]
        inputs = candidates[:, :, :-1].reshape(batch, num_chunks, chunk * feed)
        targets = candidates[:, :, 1:].reshape(batch, num_chunks, chunk * feed)
        graphdef, state = nnx.split(model)

        def one_chunk(state, xs):  # The state rides in the carry (a module can't be closed over).
            tokens, target = xs  # [B, chunk * feed] each.
            lm = nnx.merge(graphdef, state)
            x, _ = lm.embed_inputs(tokens, None)
            hidden, _ = lm.language_model(x, positions, masks, (cache.k, cache.v),
                                          cache_index=width)
            logits = lm.language_model.logits(hidden)
            picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
            return state, picked - jax.nn.logsumexp(logits, axis=-1)

        _, step = jax.lax.scan(one_chunk, state, (inputs.swapaxes(0, 1), targets.swapaxes(0, 1)))
        step = step.swapaxes(0, 1).reshape(batch, num, feed)  # log p(token i + 1 | ..., i).
        counted = jnp.arange(1, length)[None, None] < candidate_length[..., None]
        total = total + jnp.sum(jnp.where(counted, step, 0.0), axis=-1)
    return jnp.where(candidate_length > 0, total, -jnp.inf)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "stop_ids", "pad_id", "chunk"))
def _score(model, tokens, prompt_length, images, candidates, candidate_length, *,
           max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int, chunk: int):
    width = tokens.shape[1]
    tokens, input_mask = left_align(tokens, prompt_length, pad_id)
    extra = 0
    if max_new_tokens:
        extra = max_new_tokens
    if candidates is not None and candidates.shape[2] > 1:
        extra = max(extra, chunk * (candidates.shape[2] - 1))
    first, cache = prefill(model, tokens, input_mask, images, width + extra)
    out = {}
    if max_new_tokens:
        out["generated"], out["generated_length"] = _greedy_loop(
            model, first, cache, max_new_tokens, stop_ids, pad_id)
    if candidates is not None:
        out["candidate_log_likelihoods"] = _candidate_loop(
            model, first, cache, width, candidates, candidate_length, chunk)
    return out


def fit_width(tokens, width: int, pad_id: int):
    """Cuts or right-pads [B, Lp] prompts to `width` columns (numpy or jax arrays)."""
    current = tokens.shape[1]
    if current >= width:
        return tokens[:, :width]
    xp = np if isinstance(tokens, np.ndarray) else jnp
    return xp.pad(tokens, ((0, 0), (0, width - current)), constant_values=pad_id)


def prompt_width(prompt_length, buckets: Sequence[int] | None = DEFAULT_BUCKETS) -> int:
    """The bucketed width for a batch (`buckets=None`: the longest prompt, unbucketed)."""
    longest = int(np.max(np.asarray(prompt_length)))
    return longest if buckets is None else bucket_length(longest, buckets)


def score_batch(model: VLM, prompt_tokens, prompt_length, images=None, *,
                max_new_tokens: int = 0, stop_ids: Sequence[int] = (), candidates=None,
                candidate_length=None, pad_id: int = 0,
                buckets: Sequence[int] | None = DEFAULT_BUCKETS, width: int | None = None,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict[str, jax.Array]:
    """Greedy generation and/or candidate log-likelihoods from one prefill per query.

    Args:
      model: the VLM.
      prompt_tokens: [B, Lp] int32, right-padded (pipeline prompt mode).
      prompt_length: [B] int32, each >= 1.
      images: [B, S, S, 3] or None (text-only prompts skip the vision tower).
      max_new_tokens: greedy tokens to generate (0: no generation).
      stop_ids: token ids that end a row's generation (e.g. <end_of_turn>, <eos>).
      candidates: [C, Lc] or [B, C, Lc] int32 candidate answers (padded), or None.
      candidate_length: [C] or [B, C] int32; rows of length 0 score -inf.
      pad_id: the padding id written after a stop token and into padding slots.
      buckets: prompt widths to pad to (None: the batch's longest prompt).
      width: the prompt width to use instead (>= every prompt_length; skips reading
        prompt_length back to the host, e.g. when it is a sharded array).
      chunk_tokens: candidate tokens per packed chunk (see the module doc).

    Returns:
      "generated" [B, max_new_tokens] int32 and "generated_length" [B] int32 (tokens up to and
      including the first stop token) if generating; "candidate_log_likelihoods" [B, C] float32
      (sum over each candidate's tokens, not length-normalised) if candidates were given.
    """
    if width is None:
        width = prompt_width(prompt_length, buckets)
    tokens = fit_width(prompt_tokens, width, pad_id)
    if candidates is not None:
        batch = tokens.shape[0]
        candidates = jnp.asarray(candidates, jnp.int32)
        candidate_length = jnp.asarray(candidate_length, jnp.int32)
        if candidates.ndim == 2:
            candidates = jnp.broadcast_to(candidates[None], (batch, *candidates.shape))
            candidate_length = jnp.broadcast_to(candidate_length[None],
                                                (batch, *candidate_length.shape))
        num, length = candidates.shape[1:]
        chunk = max(1, min(num, chunk_tokens // max(1, length - 1)))
        padded = chunk * math.ceil(num / chunk)
        if padded != num:
            candidates = jnp.pad(candidates, ((0, 0), (0, padded - num), (0, 0)))
            candidate_length = jnp.pad(candidate_length, ((0, 0), (0, padded - num)))
    else:
        chunk = 1
    if max_new_tokens and not stop_ids:
        raise ValueError("Greedy decoding needs stop_ids (e.g. the <end_of_turn> id)")
    out = _score(model, tokens, prompt_length, images, candidates, candidate_length,
                 max_new_tokens=int(max_new_tokens), stop_ids=tuple(int(s) for s in stop_ids),
                 pad_id=int(pad_id), chunk=chunk)
    if candidates is not None and padded != num:
        out["candidate_log_likelihoods"] = out["candidate_log_likelihoods"][:, :num]
    return out


def greedy_decode(model: VLM, prompt_tokens, prompt_length, images=None, *,
                  max_new_tokens: int, stop_ids: Sequence[int], pad_id: int = 0,
                  buckets: Sequence[int] | None = DEFAULT_BUCKETS) -> tuple[jax.Array, jax.Array]:
    """Greedy continuations of right-padded prompts: (ids [B, max_new_tokens], lengths [B]).

    A row stops at its first stop token (included in its length; pad_id after it); the loop
    stops when every row has, or after `max_new_tokens`.
    """
    out = score_batch(model, prompt_tokens, prompt_length, images,
                      max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                      buckets=buckets)
    return out["generated"], out["generated_length"]


def candidate_log_likelihoods(model: VLM, prompt_tokens, prompt_length, images, candidates,
                              candidate_length, *, pad_id: int = 0,
                              buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                              chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> jax.Array:
    """[B, C] sum of log p(candidate tokens | prompt) (see `score_batch`)."""
    return score_batch(model, prompt_tokens, prompt_length, images, candidates=candidates,
                       candidate_length=candidate_length, pad_id=pad_id, buckets=buckets,
                       chunk_tokens=chunk_tokens)["candidate_log_likelihoods"]
