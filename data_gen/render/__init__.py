"""Renderers turn (persona, view) pairs into RGB images; pick one with `make_renderer`."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from data_gen.personas import Persona, ViewSpec

RENDERERS = ("procedural", "diffusion")


class Renderer(Protocol):
    def render(self, items: Sequence[tuple[Persona, ViewSpec]]) -> list[np.ndarray]:
        """One uint8 array of shape [size, size, 3] per item, in order."""


def make_renderer(renderer_config, image_size: int) -> Renderer:
    """Builds the renderer named by `renderer_config.name` (a ConfigDict; see configs/data)."""
    name = renderer_config.name
    if name == "procedural":
        from data_gen.render.procedural import ProceduralRenderer

        return ProceduralRenderer(image_size)
    if name == "diffusion":
        from data_gen.render.diffusion import DiffusionRenderer

        return DiffusionRenderer(renderer_config, image_size)
    raise ValueError(
        f"Invalid data config: renderer.name={name!r}: unknown renderer; known: {', '.join(RENDERERS)}"
    )
