"""Model configurations: frozen dataclasses, one named preset per size.

The from-scratch presets (`tiny`, `small`, `base`) use the project's own BPE tokenizer, whose
special tokens come first in `xmem_jax.data.tokenizer.SPECIAL_TOKENS` (so `<image_soft_token>`
is id 8). The `gemma3_*` presets reproduce the Hugging Face Gemma 3 checkpoints' shapes exactly,
so their safetensors load without reshaping beyond transposes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

# Id of `<image_soft_token>` in the project tokenizer (index in `SPECIAL_TOKENS`).
_TINY_IMAGE_TOKEN_ID = 8
_GEMMA3_IMAGE_TOKEN_ID = 262_144
# `VLMConfig.remat` policies (`xmem_jax.model.layers.REMAT_POLICIES` defines them).
_REMAT_NAMES = ("none", "full", "dots", "qkv")
# `VLMConfig.attention` kernels (`xmem_jax.model.attention.IMPLEMENTATIONS` defines them).
_ATTENTION_NAMES = ("auto", "xla", "splash", "cudnn")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Gemma 3 decoder.

    Layer `i` attends globally iff `(i + 1) % sliding_window_pattern == 0`, as in Hugging Face;
    the others attend to the previous `sliding_window` positions (themselves included).
    """

    vocab_size: int
    embed_dim: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    sliding_window_pattern: int = 6
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rope_global_scale: float = 1.0  # Linear RoPE scaling (positions / scale) on global layers.
    final_logit_softcap: float | None = None
    rms_norm_eps: float = 1e-6
    rope_local_scale: float = 1.0  # Linear RoPE scaling on local (sliding-window) layers.
    attention_bias: bool = False  # Biases on the q, k, v and o projections.
    tie_word_embeddings: bool = True  # False: a separate LM head (`lm_head`), not the embedding.

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def global_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends globally (else within the sliding window)."""
        return tuple((i + 1) % self.sliding_window_pattern == 0 for i in range(self.num_layers))


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """Vision-language model: SigLIP tower, projector, Gemma 3 decoder.

    `vision=None` gives a text-only model (e.g. Gemma 3 1B). `scan_layers` compiles each tower's
    layers once (compile time flat in depth); `remat` names what each layer keeps for the
    backward pass, the rest being recomputed (`layers.REMAT_POLICIES`: 'none', 'full', 'dots',
    'qkv'; False and True mean 'none' and 'full').
    """

    text: TextConfig
    vision: VisionConfig | None = None
    mm_tokens_per_image: int = 256
    image_token_id: int = _GEMMA3_IMAGE_TOKEN_ID
    dtype: Any = jnp.float32  # Activations and matmuls.
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: bool | str = False
    # Self-attention kernel (`attention.IMPLEMENTATIONS`): 'auto' picks by the platform compiled
    # for (splash on TPU, cuDNN on GPU, XLA's einsum elsewhere); 'xla', 'splash', 'cudnn' force one.
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in _ATTENTION_NAMES:
            raise ValueError(f"Unknown attention {self.attention!r}; known: "
                             f"{', '.join(_ATTENTION_NAMES)}")
        if not isinstance(self.remat, bool) and self.remat not in _REMAT_NAMES:
            raise ValueError(f"Unknown remat policy {self.remat!r}; known: "
                             f"{', '.join(_REMAT_NAMES)} (or False / True)")
        if self.vision is None:
            return
        tokens_per_side = round(self.mm_tokens_per_image**0.5)
        if tokens_per_side**2 != self.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image {self.mm_tokens_per_image} is not a square")
        if self.vision.patches_per_side % tokens_per_side:
            raise ValueError(
                f"{self.vision.patches_per_side}x{self.vision.patches_per_side} patches cannot be "
                f"average-pooled to {tokens_per_side}x{tokens_per_side} image tokens")


def tiny() -> VLMConfig:
    """1.41M parameters; trains from scratch on a laptop CPU. Patch 4 on 32 px (64 patches pooled
    to 16 tokens): held-out views are recognised far better than with patch 8 (docs/history.md)."""
    return VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=4, width=128, depth=2, mlp_dim=256,
                            num_heads=4),
        text=TextConfig(vocab_size=1024, embed_dim=128, mlp_dim=512, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
                        sliding_window_pattern=2),
        mm_tokens_per_image=16,
        image_token_id=_TINY_IMAGE_TOKEN_ID,
    )


def small() -> VLMConfig:
    """9.46M parameters."""
    return VLMConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=256, depth=4, mlp_dim=1024,
                            num_heads=4),
        text=TextConfig(vocab_size=1024, embed_dim=256, mlp_dim=1024, num_layers=6, num_heads=4,
                        num_kv_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=128,
                        sliding_window_pattern=3),
        mm_tokens_per_image=16,
        image_token_id=_TINY_IMAGE_TOKEN_ID,
    )


def base() -> VLMConfig:
    """42.9M parameters."""
    return VLMConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=384, depth=6, mlp_dim=1536,
                            num_heads=6),
        text=TextConfig(vocab_size=1024, embed_dim=512, mlp_dim=2048, num_layers=8, num_heads=8,
                        num_kv_heads=4, head_dim=64, query_pre_attn_scalar=64, sliding_window=256,
                        sliding_window_pattern=4),
        mm_tokens_per_image=16,
        image_token_id=_TINY_IMAGE_TOKEN_ID,
    )


# SigLIP so400m/14 at 896 px, as shipped with Gemma 3 4B/12B/27B.
_SIGLIP_SO400M = VisionConfig(image_size=896, patch_size=14, width=1152, depth=27, mlp_dim=4304,
                              num_heads=16)


def _gemma3(text: TextConfig, vision: VisionConfig | None) -> VLMConfig:
    return VLMConfig(text=text, vision=vision, mm_tokens_per_image=256,
                     image_token_id=_GEMMA3_IMAGE_TOKEN_ID, dtype=jnp.bfloat16,
                     param_dtype=jnp.bfloat16)


def gemma3_1b() -> VLMConfig:
    """Gemma 3 1B: text only."""
    return _gemma3(TextConfig(vocab_size=262_144, embed_dim=1152, mlp_dim=6912, num_layers=26,
                              num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256,
                              sliding_window=512), vision=None)


def gemma3_4b() -> VLMConfig:
    return _gemma3(TextConfig(vocab_size=262_208, embed_dim=2560, mlp_dim=10_240, num_layers=34,
                              num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256,
                              sliding_window=1024, rope_global_scale=8.0), _SIGLIP_SO400M)


def gemma3_12b() -> VLMConfig:
    return _gemma3(TextConfig(vocab_size=262_208, embed_dim=3840, mlp_dim=15_360, num_layers=48,
                              num_heads=16, num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256,
                              sliding_window=1024, rope_global_scale=8.0), _SIGLIP_SO400M)


def gemma3_27b() -> VLMConfig:
    # Queries are scaled by (embed_dim / num_heads)**-0.5 = 168**-0.5, not head_dim**-0.5.
    return _gemma3(TextConfig(vocab_size=262_208, embed_dim=5376, mlp_dim=21_504, num_layers=62,
                              num_heads=32, num_kv_heads=16, head_dim=128,
                              query_pre_attn_scalar=168, sliding_window=1024,
                              rope_global_scale=8.0), _SIGLIP_SO400M)


_PRESETS: dict[str, Callable[[], VLMConfig]] = {
    "tiny": tiny,
    "small": small,
    "base": base,
    "gemma3_1b": gemma3_1b,
    "gemma3_4b": gemma3_4b,
    "gemma3_12b": gemma3_12b,
    "gemma3_27b": gemma3_27b,
}


def get_model_config(name: str, **overrides: Any) -> VLMConfig:
    """Returns preset `name`, with top-level `VLMConfig` fields (e.g. `dtype`) replaced."""
    if name not in _PRESETS:
        raise ValueError(f"Unknown model config {name!r}; known: {', '.join(_PRESETS)}")
    return dataclasses.replace(_PRESETS[name](), **overrides)
