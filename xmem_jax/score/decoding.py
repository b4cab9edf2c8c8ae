"""Jitted, batched decoding with the KV cache: greedy generation and candidate log-likelihoods.

Prompts arrive right-padded (the input pipeline's prompt mode: `prompt_tokens [B, Lp]`,
`prompt_length [B]`). Inside the jitted functions they are moved to the *left* of a bucketed
width W, so every row's last prompt token sits in slot W - 1 and generated token t in slot
W + t for every row. That is what makes the cache exact: the model measures sliding-window
distances in cache slots, and with right padding a short row's padding slots would sit between
its prompt and its continuation (its window would reach fewer tokens than the uncached forward
pass's). RoPE positions count real tokens only (`vlm.positions_from_mask`), so left padding
changes nothing else.

W comes from a small fixed set (`bucket_length`: multiples of 8 up to 128, then 192, 256, 384, ...),
so a stream of batches compiles once per bucket used, not once per longest prompt.

  * `greedy_decode`: one prefill, then a `jax.lax.while_loop` of cached decode steps that stops
    when every row has emitted a stop token (`<end_of_turn>` / `<eos>`) or after
    `max_new_tokens`; returns the ids [B, max_new_tokens] (pad after the stop token) and the
    lengths (stop token included).
  * `candidate_log_likelihoods`: sum_i log p(candidate_i | prompt, candidate_<i) for C candidate
    answers per query, from ONE prefill of the prompt. The candidates are packed after the
    prompt in the cache (`PackedCandidates`): sorted, cut into chunks of about
    `DEFAULT_CHUNK_TOKENS` tokens, shared prefixes fed once per chunk (a trie), each token
    attending to the prompt and its own ancestors only, at the RoPE positions it would have
    right after the prompt. So the prompt (and its image) is encoded once per query, not once
    per candidate, its cache is never copied per candidate, and no padding is fed; see
    `recall` for the measured alternatives.
  * `score_batch`: both from one shared prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xmem_jax.model.gemma import AttentionMasks, Cache, SequenceMask, empty_kv
from xmem_jax.model.vlm import VLM, positions_from_mask

# Prompt widths: multiples of 8 up to 128, then powers of two and 1.5x them (192, 256, 384, ...):
# at most 7 tokens of padding below 128, at most a third beyond. The prompt pass dominates
# generation time, so the padding costs nearly proportionally (36-token image prompts: +11%
# at width 40, +33% at 48).
DEFAULT_BUCKETS: tuple[int, ...] = tuple(range(8, 129, 8)) + tuple(
    w for k in range(7, 16) for w in (2**k + 2**(k - 1), 2**(k + 1)))

# Candidate tokens fed per chunk: enough rows to fill the matmuls, few enough that the chunk's
# attention (every token against every slot of the chunk, mostly masked) stays cheap; 32 was
# fastest on CPU for 64 queries x 64 names (24: +4%, 96: +50%, 384: +170%).
DEFAULT_CHUNK_TOKENS = 32


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
    x, image_slots = model.embed_inputs(tokens, images)
    kv_mask = jnp.pad(input_mask, ((0, 0), (0, cache_size - length)))
    hidden, (k, v) = model.language_model(x, positions_from_mask(input_mask),
                                          SequenceMask(input_mask, image_slots),
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


@dataclasses.dataclass(frozen=True)
class PackedCandidates:
    """The candidate answers of G groups, packed for `score_batch` (host numpy arrays).

    Each group's candidates are sorted and cut into chunks of at most N fed tokens; inside a
    chunk, shared prefixes are fed once (a trie: names sharing a first name share its tokens),
    each node attending to the prompt and to its ancestors at the positions it would have right
    after the prompt. A candidate of length n is fed its first n - 1 tokens; its first token's
    log-probability comes from the prompt pass. `first` / `length` keep the candidates' order.
    """

    first: np.ndarray  # [G, C] int32: each candidate's first token.
    length: np.ndarray  # [G, C] int32: its length; 0 marks a padding candidate (scores -inf).
    tokens: np.ndarray  # [G, K, N] int32: the trie nodes fed in each chunk (0 = padding node).
    depth: np.ndarray  # [G, K, N] int32: a node's position after the prompt (0 = first token).
    ancestor: np.ndarray  # [G, K, N, N] bool: [i, j] iff node j is node i or an ancestor.
    member: np.ndarray  # [G, K, M] int32: the candidates scored in a chunk (C = none).
    nodes: np.ndarray  # [G, K, M, F] int32: the node whose output predicts token f + 1.
    targets: np.ndarray  # [G, K, M, F] int32: token f + 1.
    counted: np.ndarray  # [G, K, M, F] bool: f + 1 < length.

    @classmethod
    def build(cls, groups: Sequence[tuple[np.ndarray, np.ndarray]],
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> "PackedCandidates":
        """From (tokens [C_g, Lc_g], lengths [C_g]) per group (a chunk holds at least one
        candidate, so it grows past `chunk_tokens` for a longer candidate)."""
        packed = [_pack_group(np.asarray(t), np.asarray(n), chunk_tokens) for t, n in groups]
        sizes = [max([len(x) for p in packed for x in p[key]] + [1])
                 for key in ("nodes", "members")]
        num_nodes, num_members = sizes
        num_chunks = max(len(p["nodes"]) for p in packed)
        feed = max([len(c) - 1 for p in packed for c in p["cands"]] + [1])
        num = max(len(p["cands"]) for p in packed)
        g = len(packed)
        out = dict(first=np.zeros((g, num), np.int32), length=np.zeros((g, num), np.int32),
                   tokens=np.zeros((g, num_chunks, num_nodes), np.int32),
                   depth=np.zeros((g, num_chunks, num_nodes), np.int32),
                   ancestor=np.zeros((g, num_chunks, num_nodes, num_nodes), bool),
                   member=np.full((g, num_chunks, num_members), num, np.int32),
                   nodes=np.zeros((g, num_chunks, num_members, feed), np.int32),
                   targets=np.zeros((g, num_chunks, num_members, feed), np.int32),
                   counted=np.zeros((g, num_chunks, num_members, feed), bool))
        for i, p in enumerate(packed):
            for c, cand in enumerate(p["cands"]):
                out["length"][i, c] = len(cand)
                out["first"][i, c] = cand[0] if cand else 0
            for k, (nodes, members) in enumerate(zip(p["nodes"], p["members"])):
                index = {prefix: j for j, prefix in enumerate(nodes)}
                for j, prefix in enumerate(nodes):
                    out["tokens"][i, k, j] = prefix[-1]
                    out["depth"][i, k, j] = len(prefix) - 1
                    for d in range(1, len(prefix) + 1):
                        out["ancestor"][i, k, j, index[prefix[:d]]] = True
                for m, c in enumerate(members):
                    cand = p["cands"][c]
                    out["member"][i, k, m] = c
                    for f in range(len(cand) - 1):
                        out["nodes"][i, k, m, f] = index[cand[:f + 1]]
                        out["targets"][i, k, m, f] = cand[f + 1]
                        out["counted"][i, k, m, f] = True
        return cls(**out)

    @property
    def num_candidates(self) -> int:
        return self.first.shape[1]

    @property
    def chunk_size(self) -> int:
        return self.tokens.shape[2]


def _pack_group(tokens: np.ndarray, lengths: np.ndarray, chunk_tokens: int) -> dict:
    cands = [tuple(int(t) for t in tokens[c, :lengths[c]]) for c in range(len(lengths))]
    limit = max([chunk_tokens] + [len(c) - 1 for c in cands])
    chunks, members = [], []
    nodes: dict[tuple[int, ...], None] = {}
    current: list[int] = []
    for c in sorted(range(len(cands)), key=lambda c: cands[c]):
        feed = cands[c][:-1]
        if not feed:
            continue  # Its only token is scored from the prompt pass.
        new = [feed[:d] for d in range(1, len(feed) + 1) if feed[:d] not in nodes]
        if current and len(nodes) + len(new) > limit:
            chunks.append(list(nodes))
            members.append(current)
            nodes, current = {}, []
            new = [feed[:d] for d in range(1, len(feed) + 1)]
        nodes.update(dict.fromkeys(new))
        current.append(c)
    if current:
        chunks.append(list(nodes))
        members.append(current)
    return {"cands": cands, "nodes": chunks, "members": members}


def chunk_logits(lm: VLM, cache: Cache, width: int, tokens: jax.Array, depth: jax.Array,
                 ancestor: jax.Array) -> jax.Array:
    """Logits [B, N, V] of N trie nodes fed after each row's prompt, in one pass.

    Node i (token `tokens[b, i]`) sits at `depth[b, i]` positions after the prompt and attends to
    the prompt's `width` cache slots and to the nodes j with `ancestor[b, i, j]` (itself and its
    ancestors), with the RoPE positions and sliding-window distances it would have right after
    the prompt. The chunk's keys go to slots [width, width + N) of a copy of the cache.
    """
    size = tokens.shape[1]
    slots = jnp.arange(cache.size)
    prompt_keys = (slots < width)[None, None] & cache.kv_mask[:, None, :]  # [B, 1, S]
    in_chunk = jnp.pad(ancestor, ((0, 0), (0, 0), (width, cache.size - width - size)))
    global_ = prompt_keys | in_chunk  # [B, N, S]
    key_depth = jnp.pad(depth, ((0, 0), (width, cache.size - width - size)))
    distance = jnp.where((slots < width)[None, None],
                         (width - slots)[None, None] + depth[:, :, None],
                         depth[:, :, None] - key_depth[:, None, :])
    masks = AttentionMasks(global_=global_,
                           local=global_ & (distance < lm.config.text.sliding_window))
    x, _ = lm.embed_inputs(tokens, None)
    hidden, _ = lm.language_model(x, cache.next_position[:, None] + depth, masks,
                                  (cache.k, cache.v), cache_index=width)
    return lm.language_model.logits(hidden)


def _candidate_loop(model: VLM, first_log_probs: jax.Array, cache: Cache, width: int,
                    packed: dict[str, jax.Array], group: jax.Array) -> jax.Array:
    """[B, C] log-likelihoods of row b's group `group[b]` of packed candidates."""
    rows = {k: v[group] for k, v in packed.items()}  # Each row's group: [B, ...].
    total = jnp.take_along_axis(first_log_probs, rows["first"], axis=1)
    batch, num = total.shape
    num_chunks = rows["tokens"].shape[1]
    if num_chunks and rows["nodes"].shape[-1]:
        graphdef, state = nnx.split(model)

        def one_chunk(state, chunk):  # The state rides in the carry (a module can't be closed
            lm = nnx.merge(graphdef, state)  # over inside a loop).
            logits = chunk_logits(lm, cache, width, chunk["tokens"], chunk["depth"],
                                  chunk["ancestor"])  # [B, N, V]
            vocab = logits.shape[-1]
            nodes = chunk["nodes"].reshape(batch, -1)  # [B, M * F]
            picked = jnp.take_along_axis(logits.reshape(batch, -1),
                                         nodes * vocab + chunk["targets"].reshape(batch, -1),
                                         axis=1)
            log_probs = picked - jnp.take_along_axis(jax.nn.logsumexp(logits, axis=-1), nodes,
                                                     axis=1)
            log_probs = jnp.where(chunk["counted"].reshape(batch, -1), log_probs, 0.0)
            return state, log_probs.reshape(chunk["counted"].shape).sum(-1)  # [B, M]

        keys = ("tokens", "depth", "ancestor", "member", "nodes", "targets", "counted")
        chunks = {k: jnp.moveaxis(rows[k], 1, 0) for k in keys}  # Chunks first, for the scan.
        _, sums = jax.lax.scan(one_chunk, state, chunks)  # [K, B, M]
        # Scatter each chunk's sums to its candidates (index `num` collects empty slots).
        extra = jnp.zeros((batch, num + 1), sums.dtype).at[
            jnp.arange(batch)[:, None], rows["member"].reshape(batch, -1)].add(
            sums.transpose(1, 0, 2).reshape(batch, -1))
        total = total + extra[:, :num]
    return jnp.where(rows["length"] > 0, total, -jnp.inf)


def score_program(model, tokens, prompt_length, images, packed, group, *, max_new_tokens: int,
                  stop_ids: tuple[int, ...], pad_id: int):
    """`score_batch`'s traced body: prefill, then greedy decoding and/or packed candidates
    (`packed`: a `PackedCandidates` as a dict of arrays). `xmem_jax.aot` compiles it ahead of
    time, so it stays a plain function."""
    width = tokens.shape[1]
    tokens, input_mask = left_align(tokens, prompt_length, pad_id)
    extra = max_new_tokens
    if packed is not None:
        extra = max(extra, packed["tokens"].shape[2])
    first, cache = prefill(model, tokens, input_mask, images, width + extra)
    out = {}
    if max_new_tokens:
        out["generated"], out["generated_length"] = _greedy_loop(
            model, first, cache, max_new_tokens, stop_ids, pad_id)
    if packed is not None:
        out["candidate_log_likelihoods"] = _candidate_loop(model, first, cache, width, packed,
                                                           group)
    return out


_score = nnx.jit(score_program, static_argnames=("max_new_tokens", "stop_ids", "pad_id"))



def prefill_program(model, tokens, prompt_length, images, first_tokens, *, chunk_size: int,
                    max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int):
    """The prefill (and greedy decoding) of `score_program`, keeping the cache for candidate
    chunks fed later (`expand_program`), with the log-probabilities [B, R] of each row's
    `first_tokens` [B, R]."""
    width = tokens.shape[1]
    tokens, input_mask = left_align(tokens, prompt_length, pad_id)
    first, cache = prefill(model, tokens, input_mask, images,
                           width + max(chunk_size, max_new_tokens))
    out = {"cache": cache, "first": jnp.take_along_axis(first, first_tokens, axis=1)}
    if max_new_tokens:
        out["generated"], out["generated_length"] = _greedy_loop(
            model, first, cache, max_new_tokens, stop_ids, pad_id)
    return out


def expand_program(model, cache: Cache, rows, tokens, depth, ancestor, read_node, read_token, *,
                   width: int) -> jax.Array:
    """Log-probabilities [J, R] of `read_token` after trie node `read_node` for J chunks of trie
    nodes (`chunk_logits`), chunk j fed after the prompt of cache row `rows[j]`: chunks of
    any rows share one call, so no row waits on another's."""
    end = width + tokens.shape[1]
    cache = Cache(k=cache.k[:, rows, :end], v=cache.v[:, rows, :end],
                  kv_mask=cache.kv_mask[rows, :end], end_index=cache.end_index,
                  next_position=cache.next_position[rows])
    logits = chunk_logits(model, cache, width, tokens, depth, ancestor)  # [J, N, V]
    vocab = logits.shape[-1]
    picked = jnp.take_along_axis(logits.reshape(len(rows), -1), read_node * vocab + read_token,
                                 axis=1)
    return picked - jnp.take_along_axis(jax.nn.logsumexp(logits, axis=-1), read_node, axis=1)


run_prefill = nnx.jit(prefill_program, static_argnames=(
    "chunk_size", "max_new_tokens", "stop_ids", "pad_id"))


@functools.partial(jax.jit, static_argnames=("graphdef", "width"))
def run_expand(graphdef: nnx.GraphDef, state: nnx.State, cache: Cache, *arrays, width: int
               ) -> jax.Array:
    """`expand_program` on the model `nnx.split` into (graphdef, state): a round runs it many
    times, and splitting the model once keeps each call's dispatch cheap."""
    return expand_program(nnx.merge(graphdef, state), cache, *arrays, width=width)


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
                candidate_length=None, candidate_group=None, pad_id: int = 0,
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
      candidates: [C, Lc] (every row's) or [B, C, Lc] (each row's) int32 candidate answers,
        padded, with `candidate_length` [C] / [B, C] (0: a padding candidate, scored -inf);
        or a `PackedCandidates` of G groups with `candidate_group` [B] (row b scores group
        candidate_group[b]); or None.
      pad_id: the padding id written after a stop token and into padding slots.
      buckets: prompt widths to pad to (None: the batch's longest prompt).
      width: the prompt width to use instead (>= every prompt_length; skips reading
        prompt_length back to the host, e.g. when it is a sharded array).
      chunk_tokens: candidate tokens fed per packed chunk (see `PackedCandidates`).

    Returns:
      "generated" [B, max_new_tokens] int32 and "generated_length" [B] int32 (tokens up to and
      including the first stop token) if generating; "candidate_log_likelihoods" [B, C] float32
      (sum over each candidate's tokens, not length-normalised) if candidates were given.
    """
    if width is None:
        width = prompt_width(prompt_length, buckets)
    tokens = fit_width(prompt_tokens, width, pad_id)
    packed = group = None
    if candidates is not None:
        if isinstance(candidates, PackedCandidates):
            packed, group = candidates, candidate_group
        else:
            candidates, lengths = np.asarray(candidates), np.asarray(candidate_length)
            if candidates.ndim == 2:
                packed = PackedCandidates.build([(candidates, lengths)], chunk_tokens)
                group = np.zeros(tokens.shape[0], np.int32)
            else:
                packed = PackedCandidates.build(list(zip(candidates, lengths)), chunk_tokens)
                group = np.arange(tokens.shape[0], dtype=np.int32)
        packed = dataclasses.asdict(packed)
    if max_new_tokens and not stop_ids:
        raise ValueError("Greedy decoding needs stop_ids (e.g. the <end_of_turn> id)")
    return _score(model, tokens, prompt_length, images, packed, group,
                  max_new_tokens=int(max_new_tokens), stop_ids=tuple(int(s) for s in stop_ids),
                  pad_id=int(pad_id))


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
