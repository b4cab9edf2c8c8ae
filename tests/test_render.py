"""Renderers and the contact sheet: determinism, attribute visibility, views, sizes, bad input."""

import io
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs.data import diffusion as diffusion_config
from configs.data import procedural as procedural_config
from data_gen import attributes, personas
from data_gen.contact_sheet import contact_sheet
from data_gen.render import make_renderer
from data_gen.render import procedural
from data_gen.render.diffusion import build_prompt, view_seed


def spec_of(**overrides):
    config = procedural_config.get_config()
    config.num_personas = 50
    config.update(overrides)
    return personas.GeneratorSpec.from_config(config)


def plain_view(rng=None, **overrides) -> personas.ViewSpec:
    """A noise-free view, with a random small transform when `rng` is given."""
    fields = dict(view_id=0, offset=(0.0, 0.0), scale=1.0, tilt_degrees=0.0,
                  background=(150, 145, 140), background_gradient=0.2, light=1.0, noise_std=0.0,
                  noise_seed=0)
    if rng is not None:
        fields.update(offset=tuple(rng.uniform(-0.06, 0.06, 2)), scale=rng.uniform(0.88, 1.08),
                      tilt_degrees=rng.uniform(-8, 8), light=rng.uniform(0.85, 1.12))
    fields.update(overrides)
    return personas.ViewSpec(**fields)


def test_procedural_render_is_byte_identical_across_instances():
    spec = spec_of(image_size=64)
    items = [(p, v) for p in (personas.make_persona(spec, i) for i in range(3)) for v in p.views]
    first = procedural.ProceduralRenderer(64).render(items)
    procedural._drawing.cache_clear()  # Recorded drawings must not change the result either.
    second = procedural.ProceduralRenderer(64).render(items[::-1])[::-1]
    assert len(first) == len(items)
    for a, b in zip(first, second):
        assert a.dtype == np.uint8 and a.tobytes() == b.tobytes()


def _base_attributes(rng) -> list[dict[str, str]]:
    random_bases = [{name: str(rng.choice(list(values)))
                     for name, values in attributes.VISUAL_ATTRIBUTES.items()} for _ in range(5)]
    cluttered = {  # Everything that could hide something else.
        "age_band": "senior", "gender_presentation": "masculine", "skin_tone": "deep",
        "hair_colour": "black", "hair_style": "bald", "eye_colour": "brown",
        "eyewear": "sunglasses", "facial_hair": "beard", "headwear": "fedora",
        "clothing_colour": "black", "clothing_style": "suit jacket", "accessory": "scarf",
    }
    return random_bases + [cluttered, {**cluttered, "headwear": "beanie", "hair_style": "short"}]


def test_every_attribute_value_changes_the_image():
    """From several bases, setting any one attribute to any other value changes the pixels."""
    renderer = procedural.ProceduralRenderer(64)
    rng = np.random.default_rng(1)
    invisible = []
    for base in _base_attributes(rng):
        view = plain_view(rng)
        reference = renderer.render_one(base, view).astype(np.int16)
        for name, values in attributes.VISUAL_ATTRIBUTES.items():
            for value in values:
                if value == base[name]:
                    continue
                image = renderer.render_one({**base, name: value}, view).astype(np.int16)
                changed = int((np.abs(image - reference).max(-1) > 8).sum())
                if changed < 4:  # A few clearly changed pixels at least.
                    invisible.append((name, base[name], value, changed))
    assert not invisible, invisible


def test_views_differ_but_share_size_and_dtype():
    spec = spec_of(image_size=64)
    persona = personas.make_persona(spec, 7)
    images = procedural.ProceduralRenderer(64).render([(persona, v) for v in persona.views])
    assert len(images) == len(persona.views)
    for image in images:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert image.std() > 10  # Not a blank image.
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j]), (i, j)


def test_noise_follows_its_seed_and_light_scales():
    renderer = procedural.ProceduralRenderer(64)
    attrs = personas.make_persona(spec_of(), 0).attributes
    clean = renderer.render_one(attrs, plain_view()).astype(np.int16)
    def noisy_with(seed):
        return renderer.render_one(attrs, plain_view(noise_std=5.0, noise_seed=seed))

    noisy = noisy_with(3)
    assert np.array_equal(noisy, noisy_with(3))
    assert not np.array_equal(noisy, noisy_with(4))
    assert 2 < np.abs(noisy.astype(np.int16) - clean).mean() < 8
    assert np.array_equal(renderer.render_one(attrs, plain_view(noise_seed=9)), clean)
    darker = renderer.render_one(attrs, plain_view(light=0.8)).astype(np.int16)
    assert darker.mean() < clean.mean() * 0.85


@pytest.mark.parametrize("size", [32, 64, 224])
def test_procedural_sizes(size):
    persona = personas.make_persona(spec_of(image_size=size), 2)
    renderer = make_renderer(procedural_config.get_config().renderer, size)
    images = renderer.render([(persona, v) for v in persona.views[:2]])
    for image in images:
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert image.std() > 10


def test_unknown_renderer_is_a_clear_error():
    config = ml_collections.ConfigDict({"name": "raytracer"})
    with pytest.raises(ValueError, match=r"renderer.name='raytracer'.*procedural, diffusion"):
        make_renderer(config, 64)


def test_contact_sheet_rows_labels_and_heldout_marks():
    spec = spec_of(image_size=32)
    shown = [personas.make_persona(spec, i) for i in range(3)]
    renderer = procedural.ProceduralRenderer(32)
    rows = [renderer.render([(p, v) for v in p.views]) for p in shown]
    sheet = contact_sheet(rows, [p.name for p in shown], [p.view_heldout for p in shown])
    assert sheet.mode == "RGB"
    assert sheet.width > 8 * 96 and sheet.height > 3 * 96  # Tiles are enlarged to >= 96 px.
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).size == sheet.size
    assert np.array_equal(np.asarray(contact_sheet(rows, [p.name for p in shown])),
                          np.asarray(contact_sheet(rows, [p.name for p in shown])))
    with pytest.raises(ValueError, match="names"):
        contact_sheet(rows, ["only one name"])
    with pytest.raises(ValueError, match="heldout"):
        contact_sheet(rows, [p.name for p in shown], [[True]] * 3)


# ---------------------------------------------------------------------------------------------
# Diffusion renderer.


def test_prompt_states_every_attribute_and_varies_only_scene_words():
    persona = personas.make_persona(spec_of(), 4)
    a = persona.attributes
    prompt, negative = build_prompt(a, persona.views[0])
    for name in ("skin_tone", "eye_colour", "clothing_colour", "clothing_style", "hair_colour"):
        assert attributes.VISUAL_ATTRIBUTES[name][a[name]][0] in prompt, name
    for name in ("eyewear", "facial_hair", "headwear", "accessory"):
        if a[name] != "none":
            assert attributes.VISUAL_ATTRIBUTES[name][a[name]][0] in prompt, name
    assert "blurry" in negative
    prompts = {build_prompt(a, v)[0] for v in persona.views}
    assert len(prompts) > 1  # Scene words follow the view.
    # The identity part (before the background words) is the same in every view.
    assert len({p.split(", plain")[0].split(", gradient")[0] for p in prompts}) == 1
    assert build_prompt(a, persona.views[0]) == (prompt, negative)  # Pure.


def test_prompt_keeps_absent_items_out():
    attrs = dict(personas.make_persona(spec_of(), 0).attributes,
                 eyewear="none", headwear="none", facial_hair="none", accessory="none",
                 age_band="senior", clothing_colour="orange")
    prompt, negative = build_prompt(attrs, plain_view())
    assert "glasses" not in prompt and "glasses" in negative
    assert "hat" not in prompt.replace("that", "") and "hat" in negative
    assert "clean-shaven" in prompt and "beard" in negative
    assert "an elderly" in prompt and "an orange" in prompt


def test_view_seed_is_deterministic_and_distinct():
    persona = personas.make_persona(spec_of(), 3)
    seeds = [view_seed(persona.persona_id, v) for v in persona.views]
    assert seeds == [view_seed(persona.persona_id, v) for v in persona.views]
    assert len(set(seeds)) == len(seeds)
    assert view_seed(persona.persona_id + 1, persona.views[0]) != seeds[0]
    assert all(0 <= s < 2**63 for s in seeds)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table, which CLIP's byte-level BPE vocabulary uses."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A random, tiny Stable Diffusion pipeline (16 px images) saved to disk."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # Characters only: no merges.
        for char in _bytes_to_unicode().values():
            vocab.setdefault(char + suffix, len(vocab))
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=16))
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = tmp_path_factory.mktemp("tiny_sd")
    pipeline.save_pretrained(path)
    return path


def diffusion_renderer_config(model_dir, **overrides):
    config = diffusion_config.get_config().renderer
    config.model_dir = str(model_dir)
    config.num_inference_steps = 2
    config.batch_size = 3
    config.device = "cpu"
    config.update(overrides)
    return config


def test_diffusion_renderer_with_a_tiny_pipeline(tiny_pipeline_dir):
    spec = spec_of(num_views=2, num_heldout_views=1, image_size=32)
    items = [(p, v) for p in (personas.make_persona(spec, i) for i in range(2)) for v in p.views]
    renderer = make_renderer(diffusion_renderer_config(tiny_pipeline_dir), 32)
    images = renderer.render(items)
    assert len(images) == 4
    for image in images:
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    again = make_renderer(diffusion_renderer_config(tiny_pipeline_dir), 32).render(items)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    assert not np.array_equal(images[0], images[1])  # Another view, another seed and prompt.


def test_diffusion_renderer_rejects_bad_model_dirs(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="model_dir=''"):
        make_renderer(diffusion_renderer_config(""), 32)
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="missing.*not a directory"):
        make_renderer(diffusion_renderer_config(missing), 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*is empty"):
        make_renderer(diffusion_renderer_config(empty), 32)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(ValueError, match="broken.*could not load"):
        make_renderer(diffusion_renderer_config(broken), 32)
    if not pytest.importorskip("torch").cuda.is_available():
        with pytest.raises(ValueError, match="renderer.device='cuda:0'.*CUDA is not available"):
            make_renderer(diffusion_renderer_config(broken, device="cuda:0"), 32)


def test_heldout_view_variation_widens_only_the_held_out_views():
    """Held-out views are drawn last, so their spread leaves every training view as it was."""
    from data_gen.personas import GeneratorSpec, make_persona

    def spec(**kwargs):
        return GeneratorSpec(seed=0, num_personas=4, num_views=6, num_heldout_views=2,
                             num_descriptions=2, num_heldout_descriptions=1, image_size=32,
                             attributes=("hair_colour", "skin_tone"), view_variation=0.5,
                             **kwargs)

    same = make_persona(spec(), 1).views
    wide = make_persona(spec(heldout_view_variation=2.0), 1).views
    assert same[:4] == wide[:4]
    for narrow, far in zip(same[4:], wide[4:]):
        assert abs(far.tilt_degrees) == pytest.approx(4 * abs(narrow.tilt_degrees))
    assert make_persona(spec(heldout_view_variation=0.5), 1).views == same
    with pytest.raises(ValueError, match="heldout_view_variation=3.5"):
        spec(heldout_view_variation=3.5)
