"""Next-token cross-entropy on answer tokens only, in float32; the unlearning objectives; and
the contrastive auxiliary loss of the mitigation experiment.

Position t's logits predict token t + 1, and `loss_mask[t]` says whether token t is an answer
token, so the loss pairs logits[:, :-1] with tokens[:, 1:] weighted by loss_mask[:, 1:]: prompt,
image and padding tokens are context, never targets.

The train step never forms [B, L, V] logits: `answer_positions` picks the positions whose next
token is an answer (a static number per row), the step gathers the decoder's hidden states
there, and `answer_token_losses` applies the LM head to them in chunks of positions, each
chunk's float32 logits recomputed in the backward pass instead of stored. The functions taking
full `logits` are the reference they must equal.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# Float32 logits one chunk of `answer_token_losses` may hold (all rows): 256 MiB.
CHUNK_LOGITS = 2**26


def next_token_loss_sums(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
                         ) -> tuple[jax.Array, jax.Array]:
    """Summed answer-token negative log-likelihood and the (weighted) token count.

    Sums rather than a mean so that micro-batches and hosts combine exactly: the mean over a
    batch is sum(sums) / sum(counts), whatever the split.

    Args:
      logits: [B, L, V] (any float dtype; computed in float32).
      tokens: [B, L] int.
      loss_mask: [B, L], 1 (or a weight) where tokens[t] is an answer token.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return token_loss_sums(log_normalizer - target_logits, weights)


def token_loss_sums(token_nll: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`next_token_loss_sums` from per-position negative log-likelihoods and their weights."""
    return jnp.sum(token_nll * weights), jnp.sum(weights)


class AnswerPositions(NamedTuple):
    """Where the loss reads the model: `cap` slots per row, filled in order with the positions
    whose next token is an answer token; unused slots point at position 0 with weight 0."""

    index: jax.Array  # [B, cap] int32: position t (its logits predict token t + 1).
    targets: jax.Array  # [B, cap] int32: tokens[t + 1].
    weights: jax.Array  # [B, cap] float32: loss_mask[t + 1]; 0 in unused slots.


def answer_positions(tokens: jax.Array, loss_mask: jax.Array, cap: int | None
                     ) -> AnswerPositions:
    """The answer positions of each row, `cap` slots a row (None or more than L - 1: L - 1).

    The cap is static so that shapes are: a row with more than `cap` answer tokens loses the
    last ones from the loss, so the caller checks the batch first (the trainer does, on the
    host: `trainer.choose_answer_cap`).
    """
    weights = loss_mask[:, 1:].astype(jnp.float32)
    slots = weights.shape[1] if cap is None else min(cap, weights.shape[1])
    # A stable sort puts the answer positions first, in sequence order.
    index = jnp.argsort(weights == 0, axis=1, stable=True)[:, :slots].astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, index, axis=1)  # noqa: E731
    return AnswerPositions(index=index, targets=take(tokens[:, 1:]), weights=take(weights))


def gather_positions(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """[B, L, E] hidden states at [B, K] positions -> [B, K, E]."""
    return jnp.take_along_axis(hidden, index[..., None], axis=1)


class TokenLosses(NamedTuple):
    """Per answer slot, [B, K] float32."""

    nll: jax.Array  # -log p(target).
    reference_nll: jax.Array | None = None  # The reference model's -log p_ref(target).
    kl: jax.Array | None = None  # KL(p_ref || p) over the vocabulary.


Head = Callable[[jax.Array], jax.Array]  # [B, K, E] -> [B, K, V] float32 logits.


def answer_token_losses(head: Head, hidden: jax.Array, targets: jax.Array,
                        reference_head: Head | None = None,
                        reference_hidden: jax.Array | None = None,
                        chunk_logits: int = CHUNK_LOGITS) -> TokenLosses:
    """Cross-entropy (and, with a reference, its NLL and KL(p_ref || p)) at gathered positions,
    without holding their [B, K, V] float32 logits whole.

    Slots go through the head in chunks of `chunk_logits // (B * V)` per row (all K in one when
    they fit), chunked along K so that every chunk keeps the batch's sharding. With more than
    one chunk, each is rematerialised: the backward pass recomputes its logits from the
    [B, chunk, E] hidden states. The head's matmul runs in the compute dtype with float32
    accumulation (`gemma.Embedder.decode`); its weight gradient sums over chunks in the
    weight's dtype.

    Args:
      head: the model's LM head (`Gemma3TextModel.logits`).
      hidden: [B, K, E] hidden states at the positions (`gather_positions`).
      targets: [B, K] the token each position predicts.
      reference_head, reference_hidden: the reference model's, for `npo` and `kl` (no gradient
        flows into them).
      chunk_logits: the most float32 logits one chunk holds.
    """
    batch, slots, _ = hidden.shape
    vocab = jax.eval_shape(head, hidden[:, :1]).shape[-1]
    chunk = max(1, min(slots, chunk_logits // (batch * vocab)))
    with_reference = reference_head is not None

    def losses(hidden, targets, reference_hidden):
        logits = head(hidden).astype(jnp.float32)
        log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        take = lambda lp: -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]  # noqa
        if not with_reference:
            return TokenLosses(nll=take(log_probs))
        reference = jax.lax.stop_gradient(reference_head(reference_hidden).astype(jnp.float32))
        reference = reference - jax.nn.logsumexp(reference, axis=-1, keepdims=True)
        kl = jnp.sum(jnp.exp(reference) * (reference - log_probs), axis=-1)
        return TokenLosses(nll=take(log_probs), reference_nll=take(reference), kl=kl)

    if chunk == slots:
        return losses(hidden, targets, reference_hidden)
    num_chunks = -(-slots // chunk)
    pad = num_chunks * chunk - slots

    def chunked(x):  # [B, K, ...] -> [num_chunks, B, chunk, ...], zero-padded.
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

    inputs = (chunked(hidden), chunked(targets),
              None if reference_hidden is None else chunked(reference_hidden))
    body = jax.checkpoint(losses)
    _, per_chunk = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None, inputs)
    return jax.tree.map(
        lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, num_chunks * chunk)[:, :slots], per_chunk)


def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
                    ) -> tuple[jax.Array, jax.Array]:
    """Mean answer-token cross-entropy (0 when there are no answer tokens) and the token count."""
    total, count = next_token_loss_sums(logits, tokens, loss_mask)
    return total / jnp.where(count > 0, count, 1.0), count


# ---------------------------------------------------------------------------------------------
# Unlearning objectives: batches mix forget rows (`forget` True) and retain rows.

UNLEARNING_METHODS = ("gradient_ascent", "gradient_difference", "npo", "kl")


@dataclasses.dataclass(frozen=True)
class Objective:
    """An unlearning objective, minimised by the train step instead of the plain loss.

    gradient_ascent      -NLL of the forget rows' answers (per token)
    gradient_difference  -NLL(forget) + retain_weight * NLL(retain), over all answer tokens
    npo                  negative preference optimisation (Zhang et al. 2024) on forget rows,
                         (2 / beta) softplus(beta * (log p - log p_ref)) per answer sequence,
                         + retain_weight * NLL(retain)
    kl                   -NLL(forget) + retain_weight * KL(p_ref || p) on retain answer tokens

    `npo` and `kl` need the reference model (the model before unlearning): pass its state to
    `trainer.train(..., reference_state=...)`.
    """

    name: str
    beta: float = 0.1
    retain_weight: float = 1.0

    def __post_init__(self):
        if self.name not in UNLEARNING_METHODS:
            raise ValueError(f"Unknown unlearning method {self.name!r}; known: "
                             f"{', '.join(UNLEARNING_METHODS)}")

    @property
    def needs_reference(self) -> bool:
        return self.name in ("npo", "kl")


def _token_log_probs(logits: jax.Array) -> jax.Array:
    logits = logits[:, :-1].astype(jnp.float32)
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def unlearning_loss_sums(objective: Objective, logits: jax.Array, tokens: jax.Array,
                         loss_mask: jax.Array, forget: jax.Array,
                         reference_logits: jax.Array | None = None,
                         ) -> tuple[jax.Array, jax.Array]:
    """The objective's sum over this batch and the answer tokens it is averaged over (sums,
    so that micro-batches combine exactly, as in `next_token_loss_sums`), from full logits."""
    log_probs = _token_log_probs(logits)
    take = lambda lp: -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]  # noqa
    token_losses = TokenLosses(nll=take(log_probs))
    if objective.needs_reference:
        reference = _token_log_probs(reference_logits)
        token_losses = token_losses._replace(
            reference_nll=take(reference),
            kl=jnp.sum(jnp.exp(reference) * (reference - log_probs), axis=-1))
    return objective_loss_sums(objective, token_losses, loss_mask[:, 1:], forget)


def objective_loss_sums(objective: Objective, token_losses: TokenLosses, weights: jax.Array,
                        forget: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`unlearning_loss_sums` from per-position losses and their [B, K] weights (the answer
    positions of `answer_token_losses`, or every position)."""
    weights = weights.astype(jnp.float32)
    row_nll = jnp.sum(token_losses.nll * weights, axis=1)  # [B]
    row_tokens = jnp.sum(weights, axis=1)
    forget = forget.astype(jnp.float32)
    retain = 1.0 - forget
    if objective.name == "gradient_ascent":
        return -jnp.sum(forget * row_nll), jnp.sum(forget * row_tokens)
    if objective.name == "gradient_difference":
        forget_term = -row_nll
        retain_term = objective.retain_weight * row_nll
    elif objective.name == "npo":
        reference_nll = jnp.sum(token_losses.reference_nll * weights, axis=1)
        beta = objective.beta
        forget_term = (2.0 / beta) * jax.nn.softplus(beta * (reference_nll - row_nll))
        retain_term = objective.retain_weight * row_nll
    else:  # kl
        forget_term = -row_nll
        retain_term = objective.retain_weight * jnp.sum(token_losses.kl * weights, axis=1)
    total = jnp.sum(forget * forget_term + retain * retain_term)
    return total, jnp.sum(row_tokens)


# ---------------------------------------------------------------------------------------------
# Contrastive alignment of a persona's image and description states (mitigation).


@dataclasses.dataclass(frozen=True)
class Contrastive:
    """An auxiliary InfoNCE added to the cross-entropy: in each batch, a paired persona's
    image-prompt state and its description-prompt state are positives, other personas' states
    of the other modality negatives (`contrastive_loss_sums`). The state is the alignment
    probe's (`xmem_jax.experiments.alignment`): the residual stream after decoder layer
    `layer` (1 = the first) at the prompt's last token, centred per modality, compared by
    cosine; pulling the two together raises what that probe measures.

    The train step adds `weight` x the mean over anchors to the mean answer loss.
    """

    weight: float
    temperature: float
    layer: int

    def __post_init__(self):
        for field, value, ok in (("weight", self.weight, self.weight > 0),
                                 ("temperature", self.temperature, self.temperature > 0),
                                 ("layer", self.layer, self.layer >= 1)):
            if not ok:
                raise ValueError(f"Invalid contrastive loss: {field}={value!r} must be "
                                 f"{'at least 1' if field == 'layer' else 'positive'}")


def contrastive_loss_sums(states: jax.Array, pair_id: jax.Array, is_image: jax.Array,
                          temperature: float) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE between the image and description rows of a batch: the summed loss
    over anchors and the number of anchors (sums, so micro-batches combine).

    Each paired row (`pair_id` >= 0, the persona) is an anchor against every paired row of the
    other modality: -log of the softmax mass (similarity / temperature) on the rows with its
    `pair_id` (its persona's, usually one). A row with no such row in the batch is no anchor
    (but still a negative). States are centred per modality over the batch's paired rows and
    compared by cosine, as the alignment probe compares them.

    Args:
      states: [B, E] one state per row.
      pair_id: [B] int, the persona of a paired row, -1 on rows outside the loss.
      is_image: [B] bool, True on image-prompt rows.
      temperature: divides the cosine similarities.
    """
    states = states.astype(jnp.float32)
    paired = pair_id >= 0
    image = paired & is_image
    description = paired & ~is_image

    def centred(rows):
        weights = rows.astype(jnp.float32)[:, None]
        return states - jnp.sum(states * weights, 0) / jnp.maximum(jnp.sum(weights), 1.0)

    centred_states = jnp.where(image[:, None], centred(image), centred(description))
    unit = centred_states * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(centred_states**2, axis=1, keepdims=True), 1e-12))
    similarity = unit @ unit.T / temperature
    candidates = (image[:, None] & description[None]) | (description[:, None] & image[None])
    positives = candidates & (pair_id[:, None] == pair_id[None])
    anchors = jnp.any(positives, axis=1)
    # A finite floor, not -inf: rows that are no anchor would give inf - inf, whose NaN the
    # gradient carries through the `where` below.
    excluded = jnp.float32(-1e9)
    log_normalizer = jax.nn.logsumexp(jnp.where(candidates, similarity, excluded), axis=1)
    log_positive = jax.nn.logsumexp(jnp.where(positives, similarity, excluded), axis=1)
    per_anchor = jnp.where(anchors, log_normalizer - log_positive, 0.0)
    return jnp.sum(per_anchor), jnp.sum(anchors.astype(jnp.float32))
