"""Shared pytest setup."""

import os

# Eight fake CPU devices for sharding tests; must be set before jax is first imported.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import pytest


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
    from data_gen import dataset

    return dataset.generate(small_data_config(), tmp_path_factory.mktemp("personas"))
