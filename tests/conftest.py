"""Shared pytest setup."""

import os

# Eight fake CPU devices for sharding tests; must be set before jax is first imported.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
