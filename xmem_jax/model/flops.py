"""Useful FLOPs of a train step or a forward pass, counted from the model's shapes.

Useful means the matmul work the step needs and nothing it could skip:
- every matmul weight (`kernel`, LoRA `lora_a` / `lora_b`) costs 2 FLOPs per weight per token
  it is applied to;
- attention costs 4 x heads x head_dim per (query, key) pair a query may see: causal, and
  within the window on local layers; SigLIP's is bidirectional;
- the vision tower and projector run on rows that hold an image only;
- the LM head runs at the answer positions only (where the loss or the score reads it).

Backward: every matmul at or above the lowest trainable weight needs its input gradient (one
more forward's worth), and every trainable weight its weight gradient (one more). Frozen layers
with nothing trainable below them run forward only. Not counted: norms, softmax, elementwise
work, the optimizer update, and recomputation (remat), as in MFU's convention.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from flax import nnx

from xmem_jax.model.config import VLMConfig

_MATMUL_WEIGHTS = ("kernel", "lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class Rows:
    """The rows of one program call: how many, how long, which see images, where the head runs.

    `image_rows` may be fractional (an expected count over a task mix); `head_positions` is
    per row (a train row's answer tokens; 1 for a prefill, which predicts the next token).
    """

    rows: int
    length: int
    image_rows: float
    head_positions: int


def _attention_pairs(length: int, window: int | None, new_tokens: int | None = None) -> int:
    """(query, key) pairs a causal pass over `length` positions sees: position t sees t + 1
    keys, or min(t + 1, window). `new_tokens`: only the last that many positions query."""
    seen = np.arange(1, length + 1)
    if window is not None:
        seen = np.minimum(seen, window)
    if new_tokens is not None:
        seen = seen[length - new_tokens:]
    return int(seen.sum())


def _weights(model: nnx.Module, trainable: Callable[[tuple], bool]) -> list[tuple[str, int, bool]]:
    """(path, size, trainable) of every matmul weight."""
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if str(path[-1]) in _MATMUL_WEIGHTS:
            out.append(("/".join(map(str, path)), int(np.prod(var.shape)), trainable(path)))
    return out


def count(model: nnx.Module, shape: Rows, *, trainable: Callable[[tuple], bool] | None = None,
          frozen_layers: int = 0, cached_tokens: int = 0) -> float:
    """Useful FLOPs of one call on `shape`: a train step if `trainable` (path -> bool, the
    optimizer's filter) is given, else a forward pass.

    `frozen_layers`: the first decoder layers run on stop_gradient weights
    (`optim.freeze_layers`). `cached_tokens`: the rows extend a KV cache of that many slots
    (a decode step or a candidate chunk: `shape.length` new tokens attend to the cache too).
    """
    config: VLMConfig = model.config
    text, vision = config.text, config.vision
    is_train = trainable is not None
    trainable = trainable or (lambda path: False)
    weights = _weights(model, trainable)

    def part(prefix):
        return [(size, train) for path, size, train in weights if path.startswith(prefix)]

    vision_trains = any(t for _, t in part("vision_tower/"))
    projector_trains = any(t for _, t in part("multi_modal_projector/"))
    embed_path = ("language_model", "embed_tokens", "embedding")
    embed_trains = is_train and trainable(embed_path)
    below = is_train and (vision_trains or projector_trains or embed_trains)

    def factor(weight_trains: bool, input_grad: bool) -> int:
        return 1 + int(is_train and input_grad) + int(is_train and weight_trains)

    flops = 0.0
    # The vision tower and projector, on image rows.
    if vision is not None and shape.image_rows:
        patches = vision.num_patches
        tower = sum(2 * size * patches for size, _ in part("vision_tower/"))
        tower += 4 * vision.depth * vision.num_heads * vision.head_dim * patches * patches
        flops += shape.image_rows * tower * factor(vision_trains, vision_trains)
        projector = sum(2 * size * config.mm_tokens_per_image
                        for size, _ in part("multi_modal_projector/"))
        flops += shape.image_rows * projector * factor(projector_trains, vision_trains)

    # The decoder, layer by layer (a layer's weights are a 1 / num_layers slice of the stack).
    tokens = shape.rows * shape.length
    layers = part("language_model/layers/")
    for i, is_global in enumerate(text.global_layers):
        layer_trains = i >= frozen_layers and any(t for _, t in layers)
        below = below or layer_trains
        for size, train in layers:
            flops += tokens * 2 * size / text.num_layers * factor(
                train and i >= frozen_layers, below)
        window = None if is_global else text.sliding_window
        pairs = (_attention_pairs(cached_tokens + shape.length, window, shape.length)
                 if cached_tokens else _attention_pairs(shape.length, window))
        flops += (shape.rows * pairs * 4 * text.num_heads * text.head_dim
                  * (1 + 2 * int(is_train and below)))

    # The LM head (the embedding, or an untied `lm_head`) at the positions that are read.
    head_trains = (embed_trains if text.tie_word_embeddings
                   else is_train and trainable(("language_model", "lm_head", "embedding")))
    head = 2 * text.embed_dim * text.vocab_size * shape.rows * shape.head_positions
    flops += head * factor(head_trains, below)
    return flops
