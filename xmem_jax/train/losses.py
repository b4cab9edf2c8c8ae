"""Next-token cross-entropy on answer tokens only, in float32.

Position t's logits predict token t + 1, and `loss_mask[t]` says whether token t is an answer
token, so the loss pairs logits[:, :-1] with tokens[:, 1:] weighted by loss_mask[:, 1:]: prompt,
image and padding tokens are context, never targets.
"""

from __future__ import annotations

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
