"""Personas: a name, visual attributes, facts, image views and descriptions, from (seed, index).

Every random choice draws from a numpy generator seeded by (seed, persona index, stream), so any
persona can be rebuilt alone, in any process, byte for byte.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_gen import attributes, descriptions, names, permutation

# Independent random streams per persona.
_FACTS_STREAM, _VIEWS_STREAM, _DESCRIPTIONS_STREAM = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    """What to generate; validated from the data config (see `from_config`)."""

    seed: int
    num_personas: int
    num_views: int
    num_heldout_views: int
    num_descriptions: int
    num_heldout_descriptions: int
    image_size: int
    attributes: tuple[str, ...]
    # How much views of one persona differ (position, scale, tilt, background, lighting,
    # noise): 1 is the default spread, 0 renders every view alike, above 1 goes past it (up to
    # 3, like held-out views), where a pixel lookup of the training views stops working.
    view_variation: float = 1.0
    # The spread of held-out views (None: `view_variation`); above 1 it goes past the full
    # spread. Wider than the training views, held-out views test recognition across poses and
    # lighting no training view shows, which a pixel lookup of the training views cannot do.
    heldout_view_variation: float | None = None

    def __post_init__(self):
        def fail(field, value, why):
            raise ValueError(f"Invalid data config: {field}={value!r}: {why}")

        if self.num_personas < 1:
            fail("num_personas", self.num_personas, "must be at least 1")
        if self.num_personas > names.name_space_size():
            fail("num_personas", self.num_personas,
                 f"more personas than the name space holds ({names.name_space_size():,} names)")
        unknown = [a for a in self.attributes if a not in attributes.VISUAL_ATTRIBUTES]
        if unknown:
            fail("attributes", ",".join(unknown),
                 f"unknown attribute; known: {', '.join(attributes.ATTRIBUTE_NAMES)}")
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            fail("attributes", ",".join(self.attributes), "must be a non-empty list without repeats")
        if self.num_personas > attributes.attribute_space_size(self.attributes):
            fail("num_personas", self.num_personas,
                 f"more personas than distinct attribute sets "
                 f"({attributes.attribute_space_size(self.attributes):,}); add attributes")
        for kind in ("views", "descriptions"):
            total = getattr(self, f"num_{kind}")
            heldout = getattr(self, f"num_heldout_{kind}")
            if total < 2:
                fail(f"num_{kind}", total, "must be at least 2 (training and held-out)")
            if not 1 <= heldout < total:
                fail(f"num_heldout_{kind}", heldout, f"must be in [1, num_{kind}={total})")
        if not 16 <= self.image_size <= 512:
            fail("image_size", self.image_size, "must be between 16 and 512 pixels")
        if not 0 <= self.view_variation <= 3:
            fail("view_variation", self.view_variation, "must be in [0, 3]")
        if self.heldout_view_variation is not None and not 0 <= self.heldout_view_variation <= 3:
            fail("heldout_view_variation", self.heldout_view_variation, "must be in [0, 3]")

    @classmethod
    def from_config(cls, config) -> "GeneratorSpec":
        attrs = config.attributes
        if isinstance(attrs, str):
            attrs = tuple(a.strip() for a in attrs.split(",") if a.strip())
        return cls(
            seed=int(config.seed),
            num_personas=int(config.num_personas),
            num_views=int(config.num_views),
            num_heldout_views=int(config.num_heldout_views),
            num_descriptions=int(config.num_descriptions),
            num_heldout_descriptions=int(config.num_heldout_descriptions),
            image_size=int(config.image_size),
            attributes=tuple(attrs),
            view_variation=float(config.view_variation),
            heldout_view_variation=(None if config.get("heldout_view_variation") is None
                                    else float(config.heldout_view_variation)),
        )


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """What varies between views of one persona; identity attributes never do."""

    view_id: int
    offset: tuple[float, float]  # Head centre shift, as a fraction of the image size.
    scale: float  # Head size relative to the default.
    tilt_degrees: float
    background: tuple[int, int, int]  # Muted RGB.
    background_gradient: float  # Strength of a vertical shading, in [0, 1].
    light: float  # Brightness multiplier.
    noise_std: float  # Pixel noise standard deviation, in 0-255 units.
    noise_seed: int


@dataclasses.dataclass(frozen=True)
class Persona:
    persona_id: int
    name: str
    attributes: dict[str, str]  # Every attribute; those outside the spec keep their first value.
    facts: dict[str, str]
    views: tuple[ViewSpec, ...]
    descriptions: tuple[str, ...]
    view_heldout: tuple[bool, ...]
    description_heldout: tuple[bool, ...]


def _rng(seed: int, index: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream, *extra])


def visual_attributes(spec: GeneratorSpec, index: int) -> dict[str, str]:
    """A unique attribute set per index: a keyed permutation of the attribute product space."""
    slot = permutation.permute(
        index, attributes.attribute_space_size(spec.attributes), key=("attributes", spec.seed)
    )
    chosen = {}
    for name in spec.attributes:  # Mixed-radix digits of `slot`.
        values = tuple(attributes.VISUAL_ATTRIBUTES[name])
        slot, digit = divmod(slot, len(values))
        chosen[name] = values[digit]
    return {
        name: chosen.get(name, next(iter(values)))
        for name, values in attributes.VISUAL_ATTRIBUTES.items()
    }


def _view(rng: np.random.Generator, view_id: int, variation: float) -> ViewSpec:
    """One view's draws; `variation` scales every spread about its neutral value (the draws
    themselves stay the same, so a variation of 1 is the original dataset byte for byte)."""
    v = variation
    hue_base = rng.uniform(0, 1)
    grey = rng.uniform(150 - 40 * v, 150 + 40 * v)
    tint = 25 * v * np.cos(2 * np.pi * (hue_base + np.array([0.0, 1 / 3, 2 / 3])))
    return ViewSpec(
        view_id=view_id,
        offset=(float(rng.uniform(-0.06 * v, 0.06 * v)), float(rng.uniform(-0.05 * v, 0.05 * v))),
        scale=float(rng.uniform(1 - 0.12 * v, 1 + 0.08 * v)),
        tilt_degrees=float(rng.uniform(-8 * v, 8 * v)),
        background=tuple(int(c) for c in np.clip(grey + tint, 0, 255)),
        background_gradient=float(rng.uniform(0, 0.35 * v)),
        light=float(rng.uniform(1 - 0.15 * v, 1 + 0.12 * v)),
        noise_std=float(rng.uniform(0, 6 * v)),
        noise_seed=int(rng.integers(2**31)),
    )


def make_persona(spec: GeneratorSpec, index: int) -> Persona:
    fact_rng = _rng(spec.seed, index, _FACTS_STREAM)
    facts = {
        fact: str(values[fact_rng.integers(len(values))])
        for fact, (_, values) in attributes.FACTS.items()
    }
    view_rng = _rng(spec.seed, index, _VIEWS_STREAM)
    first_heldout = spec.num_views - spec.num_heldout_views
    heldout_variation = (spec.view_variation if spec.heldout_view_variation is None
                         else spec.heldout_view_variation)
    # Held-out views come last, so their spread leaves the training views' draws unchanged.
    views = tuple(_view(view_rng, v, heldout_variation if v >= first_heldout
                        else spec.view_variation) for v in range(spec.num_views))
    visual = visual_attributes(spec, index)
    texts = descriptions.describe(
        visual, spec.attributes, spec.num_descriptions,
        _rng(spec.seed, index, _DESCRIPTIONS_STREAM),
    )
    # Views and descriptions are i.i.d. draws, so holding out the last ones is a random split.
    return Persona(
        persona_id=index,
        name=names.persona_name(spec.seed, index),
        attributes=visual,
        facts=facts,
        views=views,
        descriptions=texts,
        view_heldout=tuple(v >= first_heldout for v in range(spec.num_views)),
        description_heldout=tuple(d >= spec.num_descriptions - spec.num_heldout_descriptions
                                  for d in range(spec.num_descriptions)),
    )
