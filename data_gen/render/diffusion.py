"""Portraits drawn by a local diffusers text-to-image pipeline (e.g. Stable Diffusion).

The prompt states every visual attribute of the persona (`build_prompt`, a pure function); the
view changes only scene words (background colour, lighting, framing) and the sampling seed, which
is derived from the view's `noise_seed` and the persona id (`view_seed`). Nothing is downloaded:
the pipeline is loaded from `renderer.model_dir`, a directory written by `save_pretrained`.
"""

from __future__ import annotations

import colorsys
import inspect
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from data_gen.attributes import VISUAL_ATTRIBUTES
from data_gen.personas import Persona, ViewSpec

logger = logging.getLogger(__name__)

_AGE = {"young adult": "young adult", "middle-aged": "middle-aged", "senior": "elderly"}
_GENDER = {"androgynous": "androgynous person", "feminine": "woman", "masculine": "man"}
# Things to keep out of the picture when the attribute is "none".
_ABSENT = {
    "eyewear": "glasses, sunglasses",
    "facial_hair": "beard, moustache, stubble",
    "headwear": "hat, cap, headband",
    "accessory": "jewellery, scarf, tie",
}
NEGATIVE_PROMPT = ("blurry, low resolution, deformed face, disfigured, extra limbs, cartoon, "
                   "drawing, text, watermark, multiple people, cropped head")
# Colour names at their hue angles (degrees); a background takes the nearest.
_HUES = {"red": 0, "orange": 30, "yellow": 55, "olive": 80, "green": 125, "teal": 175,
         "blue": 220, "purple": 275, "pink": 325}
_SEED_STREAM = 0x5D1F  # Keeps diffusion seeds apart from the procedural renderer's noise seeds.


def _phrase(attribute: str, value: str) -> str:
    """The canonical description phrase of a value."""
    return VISUAL_ATTRIBUTES[attribute][value][0]


def _background_words(view: ViewSpec) -> str:
    r, g, b = (c / 255 for c in view.background)
    hue, lightness, saturation = colorsys.rgb_to_hls(r, g, b)
    words = ["gradient" if view.background_gradient > 0.2 else "plain"]
    if lightness > 0.64 or lightness < 0.5:
        words.append("light" if lightness > 0.64 else "dark")
    if saturation < 0.08:
        words.append("grey")
    else:
        angle = hue * 360
        words += ["muted", min(_HUES, key=lambda name: 180 - abs(abs(_HUES[name] - angle) - 180))]
    return " ".join(words + ["background"])


def _scene_words(view: ViewSpec) -> list[str]:
    words = [_background_words(view)]
    if view.light < 0.93:
        words.append("dim soft lighting")
    elif view.light > 1.04:
        words.append("bright lighting")
    else:
        words.append("even lighting")
    if abs(view.tilt_degrees) > 4:
        words.append("head slightly tilted")
    words.append("close-up" if view.scale > 1.02 else "head and shoulders")
    return words


def _a(phrase: str) -> str:
    """The phrase with an indefinite article, unless it has one."""
    if phrase.startswith(("a ", "an ")):
        return phrase
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def build_prompt(attributes: dict[str, str], view: ViewSpec) -> tuple[str, str]:
    """(prompt, negative prompt) for one persona (its visual attributes) seen in one view.

    Identity words come first, so a text encoder that truncates long prompts (CLIP keeps 77
    tokens) drops scene words before any attribute.
    """
    a = attributes
    hair_colour = _phrase("hair_colour", a["hair_colour"])
    parts = [
        f"portrait photo of {_a(_AGE[a['age_band']])} {_GENDER[a['gender_presentation']]}",
        f"{_phrase('skin_tone', a['skin_tone'])} skin",
        _phrase("hair_style", a["hair_style"]).format(c=hair_colour),
        f"{_phrase('eye_colour', a['eye_colour'])} eyes",
    ]
    negatives = [NEGATIVE_PROMPT]
    for attribute in ("eyewear", "facial_hair"):
        if a[attribute] == "none":
            negatives.append(_ABSENT[attribute])
        else:
            parts.append(_phrase(attribute, a[attribute]))
    if a["facial_hair"] == "none":
        parts.append("clean-shaven")
    worn = [_a(f"{_phrase('clothing_colour', a['clothing_colour'])} "
               f"{_phrase('clothing_style', a['clothing_style'])}")]
    for attribute in ("headwear", "accessory"):
        if a[attribute] == "none":
            negatives.append(_ABSENT[attribute])
        else:
            worn.append(_a(_phrase(attribute, a[attribute])))
    parts.append("wearing " + (" and ".join(worn) if len(worn) < 3
                               else f"{', '.join(worn[:-1])} and {worn[-1]}"))
    parts += _scene_words(view)
    parts += ["centered", "sharp focus"]
    return ", ".join(parts), ", ".join(negatives)


def view_seed(persona_id: int, view: ViewSpec) -> int:
    """The sampling seed of one (persona, view): a deterministic hash of its noise seed."""
    state = np.random.SeedSequence([_SEED_STREAM, persona_id, view.noise_seed]).generate_state(
        2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63, a valid torch seed.


def _to_uint8(image, size: int) -> np.ndarray:
    """A pipeline output image (float array in [0, 1] or PIL) as uint8 [size, size, 3]."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image, dtype=np.float32)
        pil = Image.fromarray(np.clip(np.rint(array * 255), 0, 255).astype(np.uint8))
    w, h = pil.size
    if w != h:  # Centre crop to a square.
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        pil = pil.crop((left, top, left + side, top + side))
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.LANCZOS)
    return np.asarray(pil, dtype=np.uint8).copy()


class DiffusionRenderer:
    """Renders (persona, view) pairs with a diffusers pipeline loaded from a local directory."""

    def __init__(self, renderer_config, image_size: int):
        try:
            import torch
            from diffusers import DiffusionPipeline
        except ImportError as e:
            raise ImportError(
                "The diffusion renderer needs torch and diffusers: "
                "pip install torch==2.13.0 && pip install -e '.[gen]'") from e
        self._torch = torch
        self.image_size = int(image_size)
        self.batch_size = int(renderer_config.batch_size)
        self.num_inference_steps = int(renderer_config.num_inference_steps)
        self.guidance_scale = float(renderer_config.guidance_scale)
        if self.batch_size < 1:
            raise ValueError(f"Invalid data config: renderer.batch_size={self.batch_size}: "
                             f"must be at least 1")
        if self.num_inference_steps < 1:
            raise ValueError(f"Invalid data config: renderer.num_inference_steps="
                             f"{self.num_inference_steps}: must be at least 1")
        self.device = self._pick_device(str(renderer_config.device))
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model_dir = str(renderer_config.model_dir)
        self.model_dir = model_dir
        path = Path(model_dir).expanduser()
        if not model_dir:
            raise ValueError("Invalid data config: renderer.model_dir='': the diffusion renderer "
                             "needs a local diffusers pipeline directory (written by "
                             "DiffusionPipeline.save_pretrained)")
        if not path.is_dir() or not any(path.iterdir()):
            raise ValueError(f"Invalid data config: renderer.model_dir={model_dir!r}: "
                             f"{'is empty' if path.is_dir() else 'is not a directory'}; it must "
                             f"hold a diffusers pipeline written by save_pretrained")
        if not (path / "model_index.json").is_file():
            raise ValueError(f"Invalid data config: renderer.model_dir={model_dir!r}: no "
                             f"model_index.json, so not a diffusers pipeline directory")
        try:
            with warnings.catch_warnings():  # Newer diffusers prefer `dtype=`; older lack it.
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipeline = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype,
                                                             local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any loading failure is a config problem.
            raise ValueError(f"Invalid data config: renderer.model_dir={model_dir!r}: could not "
                             f"load a diffusers pipeline from it: {type(e).__name__}: {e}") from e
        self.pipeline = pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self._call_args = set(inspect.signature(self.pipeline.__call__).parameters)

    def _pick_device(self, name: str):
        torch = self._torch
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"Invalid data config: renderer.device={name!r}: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Invalid data config: renderer.device={name!r}: CUDA is not "
                             f"available on this machine; use 'auto' or 'cpu'")
        return device

    def prompts(self, items: Sequence[tuple[Persona, ViewSpec]]) -> list[tuple[str, str]]:
        return [build_prompt(persona.attributes, view) for persona, view in items]

    def render(self, items: Sequence[tuple[Persona, ViewSpec]]) -> list[np.ndarray]:
        images: list[np.ndarray] = []
        for start in range(0, len(items), self.batch_size):
            images += self._render_batch(items[start:start + self.batch_size])
        return images

    def _render_batch(self, batch: Sequence[tuple[Persona, ViewSpec]]) -> list[np.ndarray]:
        torch = self._torch
        prompts = self.prompts(batch)
        # One CPU generator per image: the same seed gives the same latents on any device.
        generators = [torch.Generator("cpu").manual_seed(view_seed(persona.persona_id, view))
                      for persona, view in batch]
        kwargs = {
            "prompt": [p for p, _ in prompts],
            "negative_prompt": [n for _, n in prompts],
            "generator": generators,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "output_type": "np",
        }
        # Pass only what this pipeline names (some have no negative prompt, for example).
        kwargs = {k: v for k, v in kwargs.items() if k in self._call_args}
        with torch.inference_mode():
            output = self.pipeline(**kwargs)
        flagged = getattr(output, "nsfw_content_detected", None)
        if flagged and any(flagged):
            logger.warning("The pipeline's safety checker blanked %d of %d images (%s)",
                           sum(bool(f) for f in flagged), len(flagged), self.model_dir)
        return [_to_uint8(image, self.image_size) for image in output.images]
