"""Next-token cross-entropy on answer tokens only, in float32; and the unlearning objectives.

Position t's logits predict token t + 1, and `loss_mask[t]` says whether token t is an answer
token, so the loss pairs logits[:, :-1] with tokens[:, 1:] weighted by loss_mask[:, 1:]: prompt,
image and padding tokens are context, never targets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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
    return jnp.sum((log_normalizer - target_logits) * weights), jnp.sum(weights)


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
    so that micro-batches combine exactly, as in `next_token_loss_sums`)."""
    log_probs = _token_log_probs(logits)
    targets = tokens[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    token_nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    row_nll = jnp.sum(token_nll * weights, axis=1)  # [B]
    row_tokens = jnp.sum(weights, axis=1)
    forget = forget.astype(jnp.float32)
    retain = 1.0 - forget
    if objective.name == "gradient_ascent":
        return -jnp.sum(forget * row_nll), jnp.sum(forget * row_tokens)
    if objective.name == "gradient_difference":
        forget_term = -row_nll
        retain_term = objective.retain_weight * row_nll
    elif objective.name == "npo":
        reference_nll = jnp.sum(-jnp.take_along_axis(
            _token_log_probs(reference_logits), targets[..., None], axis=-1)[..., 0] * weights,
            axis=1)
        beta = objective.beta
        forget_term = (2.0 / beta) * jax.nn.softplus(beta * (reference_nll - row_nll))
        retain_term = objective.retain_weight * row_nll
    else:  # kl
        reference = _token_log_probs(reference_logits)
        token_kl = jnp.sum(jnp.exp(reference) * (reference - log_probs), axis=-1)
        forget_term = -row_nll
        retain_term = objective.retain_weight * jnp.sum(token_kl * weights, axis=1)
    total = jnp.sum(forget * forget_term + retain * retain_term)
    return total, jnp.sum(row_tokens)
