"""Shared pytest setup."""

import os

# Eight fake CPU devices for sharding tests; must be set before jax is first imported.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import sys
import types

import numpy as np
import pytest


def _stub_missing_data_gen_modules():
    """Until data_gen's procedural renderer and contact sheet land, stands in for them with
    deterministic per-(persona, view) images, so the writer runs. Does nothing once they exist."""
    try:
        import data_gen.contact_sheet  # noqa: F401
    except ImportError:
        from PIL import Image

        stub = types.ModuleType("data_gen.contact_sheet")
        stub.contact_sheet = lambda rows, names, heldout=None: Image.new("RGB", (8, 8))
        sys.modules["data_gen.contact_sheet"] = stub
    from data_gen import dataset

    try:
        import data_gen.render.procedural  # noqa: F401
        return dataset, None
    except ImportError:
        pass

    class StubRenderer:
        def __init__(self, size):
            self.size = size

        def render(self, items):
            images = []
            for persona, view in items:
                rng = np.random.default_rng([persona.persona_id, view.view_id])
                images.append(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))
            return images

    return dataset, (lambda renderer_config, size: StubRenderer(size))


def small_data_config(**overrides):
    """A small persona dataset config, fast to generate."""
    from configs.data import procedural

    config = procedural.get_config()
    config.num_personas = 12
    config.num_views = 4
    config.num_heldout_views = 1
    config.num_descriptions = 4
    config.num_heldout_descriptions = 1
    config.image_size = 32
    config.contact_sheet_personas = 2
    config.tokenizer_vocab_size = 600
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def persona_dataset_dir(tmp_path_factory):
    """A small generated persona dataset (12 personas, 4 views and 4 descriptions each, the last
    of each held out, 32 px), shared by the tests of one session."""
    dataset, stub_renderer = _stub_missing_data_gen_modules()
    with pytest.MonkeyPatch.context() as patch:
        if stub_renderer is not None:
            patch.setattr(dataset, "make_renderer", stub_renderer)
        return dataset.generate(small_data_config(), tmp_path_factory.mktemp("personas"))
