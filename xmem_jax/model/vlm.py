"""The vision-language model: SigLIP tower, multimodal projector, Gemma 3 decoder.

Mirrors HF `Gemma3ForConditionalGeneration`: images become `mm_tokens_per_image` soft tokens
each, written over the placeholder tokens (`config.image_token_id`) in order; tokens of one image
attend to each other bidirectionally, everything else is causal.

Hugging Face names (transformers 5 `state_dict`, `model.` prefix dropped; hub safetensors spell
them `vision_tower.vision_model.*` and `language_model.model.*`) map onto ours as follows; see
`siglip` and `gemma` for the inner names:

  vision_tower.*                              -> vision_tower.*
  multi_modal_projector.mm_input_projection_weight [W, E]
                                              -> multi_modal_projector.mm_input_projection.kernel
  multi_modal_projector.mm_soft_emb_norm.weight
                                              -> multi_modal_projector.mm_soft_emb_norm.scale
  language_model.*                            -> language_model.*
  lm_head.weight                              -> language_model.lm_head.embedding if untied;
                                                 else tied to language_model.embed_tokens
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xmem_jax.model.config import VLMConfig
from xmem_jax.model import attention
from xmem_jax.model.gemma import (Cache, Gemma3TextModel, SequenceMask, attention_masks,
                                  empty_kv)
from xmem_jax.model.layers import Einsum, RMSNorm
from xmem_jax.model.siglip import SiglipVisionTower


# uint8 pixel -> its value in [-1, 1], computed on the host exactly as the input pipeline's
# `normalize_images` computes it (x * float32(1 / 127.5) - 1 in float32). On the device XLA fuses
# that arithmetic into one multiply-add, which rounds 158 of the 256 values differently; a lookup
# gives the host's values bit for bit.
PIXEL_VALUES = np.arange(256, dtype=np.float32) * np.float32(1 / 127.5) - np.float32(1)


class MultiModalProjector(nnx.Module):
    """Patch features -> soft tokens: average-pool the patch grid, RMSNorm, project to E."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        vision = config.vision
        self.patches_per_side = vision.patches_per_side
        self.tokens_per_side = round(config.mm_tokens_per_image**0.5)
        self.mm_soft_emb_norm = RMSNorm(vision.width, eps=vision.layer_norm_eps,
                                        param_dtype=config.param_dtype)
        # The input dim gets no logical name: 'vision_embed' and 'embed' both map to one mesh axis.
        self.mm_input_projection = Einsum("...w,we->...e", (vision.width, config.text.embed_dim),
                                          (None, "embed"), dtype=config.dtype,
                                          param_dtype=config.param_dtype, rngs=rngs)

    def __call__(self, patches: jax.Array) -> jax.Array:
        """[B, num_patches, W] -> [B, mm_tokens_per_image, E]."""
        batch, _, width = patches.shape
        side = self.tokens_per_side
        pool = self.patches_per_side // side
        grid = patches.reshape(batch, side, pool, side, pool, width)
        pooled = jnp.mean(grid.astype(jnp.float32), axis=(2, 4)).astype(patches.dtype)
        pooled = pooled.reshape(batch, side * side, width)
        return self.mm_input_projection(self.mm_soft_emb_norm(pooled)).astype(patches.dtype)


def image_blocks(is_image: jax.Array) -> jax.Array:
    """[B, L] bool -> [B, L] int: index of the image run each token is in, -1 for text.

    A run is a maximal stretch of consecutive placeholders (Gemma 3 wraps each image in
    begin/end-of-image tokens, so runs and images coincide).
    """
    starts = is_image & ~jnp.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(is_image, jnp.cumsum(starts, axis=1) - 1, -1)


def positions_from_mask(input_mask: jax.Array) -> jax.Array:
    """[B, L] bool -> [B, L] RoPE positions counting real tokens only (left padding works)."""
    return jnp.maximum(jnp.cumsum(input_mask, axis=-1) - 1, 0).astype(jnp.int32)


class VLM(nnx.Module):
    """Gemma 3 style vision-language model; `config.vision=None` builds a text-only model."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        has_vision = config.vision is not None
        self.vision_tower = SiglipVisionTower(config, rngs=rngs) if has_vision else None
        self.multi_modal_projector = MultiModalProjector(config, rngs=rngs) if has_vision else None
        self.language_model = Gemma3TextModel(config, rngs=rngs)

    def encode_images(self, images: jax.Array) -> jax.Array:
        """[B, S, S, 3] or [B, N, S, S, 3] pixels -> [B, N * mm_tokens_per_image, E].

        Pixels are floats in [-1, 1], or uint8 as decoded (the input pipeline's prompt mode:
        a quarter of the bytes to the device), looked up in `PIXEL_VALUES` here.
        """
        if self.vision_tower is None:
            raise ValueError("This model is text-only (config.vision is None) but got images")
        if images.dtype == jnp.uint8:
            images = jnp.asarray(PIXEL_VALUES)[images]
        batch = images.shape[0]
        images = images.reshape(-1, *images.shape[-3:])
        soft_tokens = self.multi_modal_projector(self.vision_tower(images))
        return soft_tokens.reshape(batch, -1, soft_tokens.shape[-1])

    def embed_inputs(self, tokens: jax.Array, images: jax.Array | None,
                     ) -> tuple[jax.Array, attention.ImageSlots | None]:
        """Token embeddings with image soft tokens written over the placeholders, in order.

        Returns the embeddings [B, L, E] and where the image tokens are (None without images).
        Extra soft tokens are dropped; surplus placeholders repeat the last soft token.
        """
        config = self.config
        lm_tokens = tokens
        if config.image_token_id >= config.text.vocab_size:  # HF embeds such placeholders as 0.
            lm_tokens = jnp.where(tokens == config.image_token_id, 0, tokens)
        x = self.language_model.embed_tokens.encode(lm_tokens)
        if images is None:
            return x, None
        soft_tokens = self.encode_images(images)
        is_image = tokens == config.image_token_id
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, soft_tokens.shape[1] - 1)
        placed = jnp.take_along_axis(soft_tokens, index[..., None], axis=1).astype(x.dtype)
        return (jnp.where(is_image[..., None], placed, x),
                attention.image_slots(image_blocks(is_image), soft_tokens.shape[1]))

    def _decoder_inputs(self, tokens: jax.Array, images: jax.Array | None,
                        input_mask: jax.Array | None) -> tuple:
        """(embeddings, RoPE positions, `SequenceMask`) of a full sequence for the decoder."""
        if input_mask is None:
            input_mask = jnp.ones(tokens.shape, bool)
        x, image_slots = self.embed_inputs(tokens, images)
        return x, positions_from_mask(input_mask), SequenceMask(input_mask, image_slots)

    def __call__(self, tokens: jax.Array, images: jax.Array | None = None,
                 input_mask: jax.Array | None = None, *, frozen_layers: int = 0) -> jax.Array:
        """Full-sequence forward pass (training, scoring).

        Args:
          tokens: [B, L] int32, with `image_token_id` placeholders where images go.
          images: [B, S, S, 3] (or [B, N, S, S, 3]) float32 in [-1, 1] or uint8
            (`encode_images`), or None for text only.
          input_mask: [B, L] bool, False for padding (never attended to); None means all real.
          frozen_layers: the first this many decoder layers get no gradient (training with
            `optim.freeze_layers`).

        Returns:
          [B, L, V] float32 logits; position t predicts token t + 1.
        """
        return self.language_model.logits(self.hidden_states(tokens, images, input_mask,
                                                             frozen_layers=frozen_layers))

    def hidden_states(self, tokens: jax.Array, images: jax.Array | None = None,
                      input_mask: jax.Array | None = None, *, frozen_layers: int = 0,
                      probe_positions: jax.Array | None = None):
        """The decoder's normed output, [B, L, E], before the LM head (arguments as in
        `__call__`): a loss gathers the positions it needs and applies
        `language_model.logits` to those only, not to [B, L, V]. With `probe_positions` ([B]),
        (that output, the residual stream at those positions after every layer
        [num_layers, B, E]), for a loss on intermediate states."""
        outputs = self.language_model(*self._decoder_inputs(tokens, images, input_mask),
                                      frozen_layers=frozen_layers,
                                      probe_positions=probe_positions)
        return outputs[0] if probe_positions is None else (outputs[0], outputs[2])

    def layer_outputs(self, tokens: jax.Array, images: jax.Array | None = None,
                      input_mask: jax.Array | None = None) -> jax.Array:
        """The decoder's residual stream after each layer, [num_layers, B, L, E]; arguments as
        in `__call__`. For probing what the layers represent."""
        return self.language_model.layer_outputs(*self._decoder_inputs(tokens, images,
                                                                       input_mask))

    def prefill(self, tokens: jax.Array, images: jax.Array | None = None,
                input_mask: jax.Array | None = None, *, cache_size: int) -> tuple[jax.Array, Cache]:
        """Runs the prompt into a fresh cache of `cache_size` slots.

        Same arguments as `__call__`; `cache_size` must cover the prompt plus every token to be
        decoded. Returns [B, L, V] float32 logits and the cache.
        """
        batch, length = tokens.shape
        if cache_size < length:
            raise ValueError(f"cache_size {cache_size} is smaller than the prompt length {length}")
        x, positions, mask = self._decoder_inputs(tokens, images, input_mask)
        kv_mask = jnp.zeros((batch, cache_size), bool).at[:, :length].set(mask.valid)
        empty = empty_kv(self.config, batch, cache_size)
        hidden, (k, v) = self.language_model(x, positions, mask, empty, cache_index=0)
        cache = Cache(k=k, v=v, kv_mask=kv_mask, end_index=jnp.asarray(length, jnp.int32),
                      next_position=jnp.sum(mask.valid, axis=1, dtype=jnp.int32))
        return self.language_model.logits(hidden), cache

    def decode_step(self, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Feeds one text token per row, [B] int32; returns next-token logits [B, V] and the cache.

        Shapes are fixed, so greedy decoding is a `jax.lax.while_loop` over this step: carry the
        model's `nnx.split` state with the cache and `nnx.merge` it in the body.
        """
        x, _ = self.embed_inputs(tokens[:, None], None)
        slot = cache.end_index
        kv_mask = jax.lax.dynamic_update_slice_in_dim(
            cache.kv_mask, jnp.ones((tokens.shape[0], 1), bool), slot, axis=1)
        masks = attention_masks(slot[None], jnp.arange(cache.size), kv_mask,
                                self.config.text.sliding_window)
        hidden, (k, v) = self.language_model(x, cache.next_position[:, None], masks,
                                             (cache.k, cache.v), cache_index=slot)
        logits = self.language_model.logits(hidden)[:, 0]
        return logits, Cache(k=k, v=v, kv_mask=kv_mask, end_index=slot + 1,
                             next_position=cache.next_position + 1)


def count_parameters(model: nnx.Module, filter: nnx.filterlib.Filter = nnx.Param) -> int:
    """The number of parameter values `filter` selects in `model`. Works on abstract models too,
    so a size is counted without allocating it: `count_parameters(nnx.eval_shape(build))`."""
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, filter)))
