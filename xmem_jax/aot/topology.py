"""The devices of a slice to compile for, and what each chip offers.

`slice_devices('v5p:2x2x1')` gives the devices of a TPU slice that is not attached (libtpu
describes the topology; nothing runs); `slice_devices('cpu:8')` gives this process's CPU
devices (fake ones, from `--xla_force_host_platform_device_count`), for tests.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax

GiB = 2**30

# Slices the tables in docs/tpu.md use, and what a user might mistype them for.
EXAMPLES = ("v5e:2x2", "v5p:2x2x1", "v5p:2x2x2", "v5p:4x4x4", "v6e:2x4", "v6e:4x4", "v6e:8x8")
_NAME = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per chip: HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s (Cloud TPU documentation)."""

    name: str
    hbm_bytes: float
    bf16_flops: float
    hbm_bandwidth: float


# By `device.device_kind`, as libtpu reports it.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9),
}


class TopologyError(ValueError):
    """A slice that cannot be described here: a bad name, or libtpu missing."""


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def slice_devices(topology: str) -> list[jax.Device]:
    """The devices of `topology`: 'cpu:N' (this process's first N CPU devices) or a TPU slice
    name such as 'v5p:2x2x1' (a v5p-8: 4 chips)."""
    if topology.startswith("cpu:"):
        count = int(topology[4:])
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise TopologyError(
                f"--topology={topology} needs {count} CPU devices; this process has "
                f"{len(devices)}. Set XLA_FLAGS=--xla_force_host_platform_device_count={count} "
                "before jax starts (python -m xmem_jax.compile does it for you)")
        return devices[:count]
    if not _NAME.match(topology):
        raise TopologyError(f"Unknown topology {topology!r}: give GENERATION:SHAPE with "
                            f"GENERATION one of v4, v5e, v5p, v6e, e.g. {', '.join(EXAMPLES)}; "
                            "or cpu:N for fake CPU devices")
    if not libtpu_installed():
        raise TopologyError(f"--topology={topology} needs libtpu to describe the slice, and it "
                            "is not installed: pip install -e '.[tpu]' (or use cpu:N)")
    # libtpu looks for a TPU on this machine unless told it is a (single-host) TPU VM, and
    # locks itself to one process unless allowed more (parallel compiles and tests).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topology.split(':')[0]}-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as error:  # libtpu's JaxRuntimeError: an unknown generation or shape.
        raise TopologyError(f"libtpu does not know topology {topology!r}: {error}. "
                            f"Known to work: {', '.join(EXAMPLES)}") from None
    return list(description.devices)


def chip_of(device: jax.Device) -> Chip | None:
    """The chip's figures; None for CPU devices (no HBM, no meaningful peak)."""
    return CHIPS.get(device.device_kind)
