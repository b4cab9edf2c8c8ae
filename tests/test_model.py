"""The VLM: shapes, attention structure (causal, image blocks, sliding window), KV-cache decoding,
scan/remat equivalence, real Gemma 3 sizes, and sharded construction."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xmem_jax.model import VLM, count_parameters, get_model_config
from xmem_jax.model import attention
from xmem_jax.model.gemma import SequenceMask
from xmem_jax.model.vlm import MultiModalProjector, image_blocks, positions_from_mask
from xmem_jax.train import sharding

TINY = get_model_config("tiny")
IMAGE = TINY.image_token_id
TOKENS_PER_IMAGE = TINY.mm_tokens_per_image
BOS = 2


def with_text(config, **changes):
    return dataclasses.replace(config, text=dataclasses.replace(config.text, **changes))


def make_tokens(batch, text_len, seed=0, image=True):
    """[BOS, image placeholders..., text...] rows; text ids avoid the special tokens."""
    text = jax.random.randint(jax.random.key(seed), (batch, text_len), 9, TINY.text.vocab_size)
    parts = [jnp.full((batch, 1), BOS)]
    if image:
        parts.append(jnp.full((batch, TOKENS_PER_IMAGE), IMAGE))
    return jnp.concatenate(parts + [text], axis=1).astype(jnp.int32)


def make_images(batch, seed=1):
    size = TINY.vision.image_size
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1.0, maxval=1.0)


@nnx.jit
def forward(model, tokens, images, input_mask=None):
    return model(tokens, images, input_mask)


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: VLM(TINY, rngs=nnx.Rngs(0)))()


def test_unknown_config_lists_known_names():
    with pytest.raises(ValueError, match="tiny.*gemma3_27b"):
        get_model_config("huge")


def test_unknown_remat_policy_lists_known_names():
    with pytest.raises(ValueError, match="none, full, dots, qkv"):
        dataclasses.replace(TINY, remat="some")


def test_tiny_forward_shapes_and_finite(model):
    tokens, images = make_tokens(2, 15), make_images(2)
    logits = forward(model, tokens, images)
    assert logits.shape == (2, tokens.shape[1], TINY.text.vocab_size)
    assert logits.dtype == jnp.float32
    assert jnp.isfinite(logits).all()
    text_only = forward(model, make_tokens(2, 15, image=False), None)
    assert text_only.shape == (2, 16, TINY.text.vocab_size) and jnp.isfinite(text_only).all()


def test_bfloat16_forward_is_finite():
    config = dataclasses.replace(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = nnx.jit(lambda: VLM(config, rngs=nnx.Rngs(0)))()
    assert model.language_model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    logits = forward(model, make_tokens(2, 15), make_images(2))
    assert logits.dtype == jnp.float32 and jnp.isfinite(logits).all()


def test_later_text_token_does_not_change_earlier_logits(model):
    tokens, images = make_tokens(2, 15), make_images(2)
    changed_at = tokens.shape[1] - 6
    changed = tokens.at[:, changed_at].set(tokens[:, changed_at] % 500 + 9)
    before, after = forward(model, tokens, images), forward(model, changed, images)
    np.testing.assert_allclose(before[:, :changed_at], after[:, :changed_at], atol=1e-5)
    assert not np.allclose(before[:, changed_at:], after[:, changed_at:], atol=1e-3)


def test_attention_sees_causal_keys_its_whole_image_and_the_window():
    # BOS, image A (2 tokens), text, image B (2 tokens), text; window 3. With zero queries and
    # keys the weights are uniform over the keys a query may see, and one-hot values read them.
    is_image = jnp.array([[0, 1, 1, 0, 1, 1, 0]], bool)
    blocks = image_blocks(is_image)
    np.testing.assert_array_equal(blocks, [[-1, 0, 0, -1, 1, 1, -1]])
    zeros = jnp.zeros((1, 7, 1, 7))
    values = jnp.eye(7)[None, :, None, :]

    def seen(is_global):
        out = attention.self_attention(zeros, zeros, values, scale=1.0, implementation="xla",
                                       window=3, is_global=jnp.asarray(is_global),
                                       images=attention.image_slots(blocks, 4))
        return np.asarray(out[0, :, 0] > 0)

    expected_global = np.tril(np.ones((7, 7), bool))
    expected_global[1, 2] = expected_global[4, 5] = True  # Within an image, both ways.
    np.testing.assert_array_equal(seen(True), expected_global)
    in_window = np.subtract.outer(np.arange(7), np.arange(7)) < 3
    np.testing.assert_array_equal(seen(False), expected_global & in_window)


def test_image_tokens_attend_bidirectionally_within_their_image(model):
    """Perturbing an image's last soft token moves its first one, but nothing before it."""
    tokens = make_tokens(1, 8)
    x, image_slots = nnx.jit(lambda model, tokens, images: model.embed_inputs(tokens, images))(
        model, tokens, make_images(1))
    last_image_slot = TOKENS_PER_IMAGE  # Slot 0 is BOS.
    input_mask = jnp.ones(tokens.shape, bool)
    positions = positions_from_mask(input_mask)

    @nnx.jit
    def hidden(decoder, x, image_slots):
        return decoder(x, positions, SequenceMask(input_mask, image_slots))[0]

    perturbed = x.at[:, last_image_slot].add(1.0)
    base, moved = (hidden(model.language_model, x_, image_slots) for x_ in (x, perturbed))
    np.testing.assert_allclose(base[:, 0], moved[:, 0], atol=1e-6)  # BOS precedes the image.
    assert not np.allclose(base[:, 1], moved[:, 1], atol=1e-4)  # First image token sees the last.
    base, moved = (hidden(model.language_model, x_, None) for x_ in (x, perturbed))  # Causal.
    np.testing.assert_allclose(base[:, 1], moved[:, 1], atol=1e-6)


def test_local_layers_do_not_see_beyond_the_window():
    """Two local layers with window 4: position t sees tokens t-6..t, never t-7."""
    local_only = with_text(TINY, num_layers=2, sliding_window=4, sliding_window_pattern=3)
    model = nnx.jit(lambda: VLM(local_only, rngs=nnx.Rngs(0)))()
    tokens = make_tokens(1, 15, image=False)
    changed = tokens.at[:, 0].set(BOS + 7)
    delta = jnp.abs(forward(model, tokens, None) - forward(model, changed, None)).max(axis=(0, 2))
    assert (delta[:7] > 1e-4).all()  # Within 2 * (window - 1) of the change.
    np.testing.assert_allclose(delta[7:], 0.0, atol=1e-6)

    global_too = with_text(local_only, sliding_window_pattern=2)
    model = nnx.jit(lambda: VLM(global_too, rngs=nnx.Rngs(0)))()
    delta = jnp.abs(forward(model, tokens, None) - forward(model, changed, None)).max(axis=(0, 2))
    assert (delta[7:] > 1e-4).all()


@pytest.mark.parametrize("left_pad", [0, 3])
def test_kv_cache_decode_matches_full_forward(left_pad):
    """Prefill a prompt, then feed the rest one token at a time inside a jitted scan."""
    config = with_text(TINY, sliding_window=8)  # Decoding runs past the window.
    model = nnx.jit(lambda: VLM(config, rngs=nnx.Rngs(0)))()
    tokens, images = make_tokens(2, 14), make_images(2)
    # Row 1 is left-padded: its first `left_pad` slots are padding.
    tokens = tokens.at[1].set(jnp.roll(tokens[1], left_pad))
    input_mask = jnp.ones(tokens.shape, bool).at[1, :left_pad].set(False)
    full = forward(model, tokens, images, input_mask)

    prompt_len = TOKENS_PER_IMAGE + 4 + left_pad
    cache_size = tokens.shape[1] + 5  # Spare slots must stay invisible.

    @nnx.jit
    def prefill_then_decode(model, tokens, images, input_mask):
        prompt_logits, cache = model.prefill(tokens[:, :prompt_len], images,
                                             input_mask[:, :prompt_len], cache_size=cache_size)

        graphdef, state = nnx.split(model)  # jax.lax loops carry arrays, not modules.

        def step(carry, token):
            state, cache = carry
            logits, cache = nnx.merge(graphdef, state).decode_step(token, cache)
            return (state, cache), logits

        _, decoded = jax.lax.scan(step, (state, cache), tokens[:, prompt_len:].T)
        return prompt_logits, decoded.transpose(1, 0, 2)

    prompt_logits, decoded = prefill_then_decode(model, tokens, images, input_mask)
    valid = input_mask[:, :prompt_len]
    np.testing.assert_allclose(prompt_logits[valid], full[:, :prompt_len][valid], atol=1e-4)
    np.testing.assert_allclose(decoded, full[:, prompt_len:], atol=1e-4)


def test_scanned_and_unrolled_layers_agree(model):
    tokens, images = make_tokens(2, 15), make_images(2)
    unrolled_config = dataclasses.replace(TINY, scan_layers=False)
    unrolled_graph = nnx.graphdef(nnx.eval_shape(lambda: VLM(unrolled_config, rngs=nnx.Rngs(0))))
    unrolled = nnx.merge(unrolled_graph, nnx.state(model))
    np.testing.assert_allclose(forward(unrolled, tokens, images), forward(model, tokens, images),
                               atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("remat", [True, "full", "dots", "qkv"])
def test_remat_keeps_loss_and_gradients(remat):
    tokens, images = make_tokens(2, 15), make_images(2)
    targets = jnp.roll(tokens, -1, axis=1)

    @nnx.jit
    def loss_and_grads(model):
        def loss(model):
            logits = model(tokens, images)
            log_probs = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))
        return nnx.value_and_grad(loss)(model)

    configs = (dataclasses.replace(TINY, remat=policy) for policy in (False, remat))
    (loss, grads), (remat_loss, remat_grads) = (
        loss_and_grads(nnx.jit(lambda: VLM(config, rngs=nnx.Rngs(0)))()) for config in configs)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), remat_grads, grads)


@pytest.mark.parametrize("scan", [True, False])
def test_frozen_layers_get_no_weight_gradient_but_pass_gradient_down(model, scan):
    """Frozen leading layers: zero weight gradient; the layers above and everything below (here
    the vision tower, reached through the frozen layers' activations) get the same gradient as
    without freezing, and the forward pass is unchanged."""
    tokens, images = make_tokens(2, 15), make_images(2)
    graph = nnx.graphdef(nnx.eval_shape(
        lambda: VLM(dataclasses.replace(TINY, scan_layers=scan), rngs=nnx.Rngs(0))))
    model = nnx.merge(graph, nnx.state(model))

    @nnx.jit(static_argnames="frozen")
    def loss_and_grads(model, frozen):
        return nnx.value_and_grad(
            lambda m: jnp.mean(m(tokens, images, frozen_layers=frozen) ** 2))(model)

    (loss, grads), (frozen_loss, frozen_grads) = (loss_and_grads(model, k) for k in (0, 1))
    np.testing.assert_allclose(frozen_loss, loss, rtol=1e-6)
    flat, frozen_flat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(frozen_grads))
    for path, grad in flat.items():
        name = "/".join(map(str, path))
        grad, frozen_grad = np.asarray(grad[...]), np.asarray(frozen_flat[path][...])
        if name.startswith("language_model/layers/"):
            np.testing.assert_array_equal(frozen_grad[:1], 0, err_msg=name)
            np.testing.assert_allclose(frozen_grad[1:], grad[1:], atol=1e-6, err_msg=name)
        else:
            np.testing.assert_allclose(frozen_grad, grad, atol=1e-6, err_msg=name)
    vision = [np.abs(np.asarray(g[...])).max() for p, g in frozen_flat.items()
              if p[0] == "vision_tower"]
    assert vision and max(vision) > 0


def test_projector_average_pools_patch_grid():
    config = dataclasses.replace(  # 4x4 patches -> 2x2 tokens.
        TINY, vision=dataclasses.replace(TINY.vision, patch_size=8), mm_tokens_per_image=4)
    projector = MultiModalProjector(config, rngs=nnx.Rngs(0))
    projector.mm_input_projection.kernel[...] = jnp.eye(config.vision.width, config.text.embed_dim)
    patches = jax.random.normal(jax.random.key(0), (1, 16, config.vision.width))
    tokens = projector(patches)
    pooled = patches[0, jnp.array([0, 1, 4, 5])].mean(axis=0)  # Top-left 2x2 patches.
    expected = pooled / jnp.sqrt(jnp.mean(pooled**2) + config.vision.layer_norm_eps)
    assert tokens.shape == (1, 4, config.text.embed_dim)
    np.testing.assert_allclose(tokens[0, 0], expected, atol=1e-5)


@pytest.mark.parametrize("name, expected", [
    ("gemma3_1b", 999_885_952),
    ("gemma3_4b", 4_300_079_472),
    ("gemma3_12b", 12_187_325_040),
    ("gemma3_27b", 27_432_406_640),
])
def test_gemma3_parameter_counts_match_hf(name, expected):
    abstract = nnx.eval_shape(lambda: VLM(get_model_config(name), rngs=nnx.Rngs(0)))
    assert count_parameters(abstract) == expected


def test_sharding_rejects_indivisible_dims():
    mesh = sharding.make_mesh(1, 1, 8)  # tiny has 2 KV heads.
    expected = r"k_proj/kernel dim 2 \(size 2, logical axis 'kv_heads'\).*tensor"
    with pytest.raises(ValueError, match=expected):
        sharding.abstract_model(lambda: VLM(TINY, rngs=nnx.Rngs(0)), mesh)


def test_abstract_model_carries_shardings():
    mesh = sharding.make_mesh(2, 2, 2)
    config = get_model_config("gemma3_4b")
    _, state = sharding.abstract_model(lambda: VLM(config, rngs=nnx.Rngs(0)), mesh)
    q_kernel = state["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q_kernel.shape == (34, 2560, 8, 256)
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_model_matches_unsharded(model, mesh_shape):
    tokens, images = make_tokens(8, 15), make_images(8)
    expected = forward(model, tokens, images)
    mesh = sharding.make_mesh(*mesh_shape)
    sharded = sharding.create_sharded_model(lambda: VLM(TINY, rngs=nnx.Rngs(0)), mesh)
    embedding = sharded.language_model.embed_tokens.embedding[...]
    assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    with sharding.use_mesh(mesh):
        logits = nnx.jit(lambda m, t, i: m(t, i))(sharded, tokens, images)
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_layer_outputs_end_in_the_hidden_state_the_logits_read(model):
    tokens, images = make_tokens(2, 10), make_images(2)
    outputs = model.layer_outputs(tokens, images)
    assert outputs.shape == (TINY.text.num_layers, 2, tokens.shape[1], TINY.text.embed_dim)
    lm = model.language_model
    np.testing.assert_allclose(np.asarray(lm.logits(lm.norm(outputs[-1]))),
                               np.asarray(forward(model, tokens, images)), rtol=1e-5, atol=1e-5)
