"""Several JAX processes as one job: start-up, shared-directory and batch checks, and the rule
that one process writes what all of them share.

A TPU slice larger than one host runs one process per host; the environment tells
`jax.distributed.initialize()` the coordinator and the process ids. Anywhere else (CPU
processes on one machine, in CI) they are given explicitly:

    python -m xmem_jax.main --coordinator_address=localhost:12345 --num_processes=2 \
        --process_id=K --num_cpu_devices=4 --config=... --workdir=...

Every process runs the same program on its share of each global batch; collectives go over
the devices (gloo between CPU processes). Files the processes share (results, reports, plots,
the dataset and base-model caches) are written by process 0 alone, the others waiting at a
barrier (`on_primary`, `primary_first`); Orbax writes checkpoints from all of them.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, TypeVar

import jax
from etils import epath

T = TypeVar("T")

# How long a process waits at a barrier for the others: process 0 may be building a dataset or
# a base model meanwhile.
BARRIER_TIMEOUT_S = 6 * 3600
_barrier_ids = itertools.count()


class CoordinatorUnreachableError(TimeoutError):
    """The coordinator (process 0) did not answer at its address in time."""


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with an error naming the flag."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator_address={address!r} must be HOST:PORT (e.g. "
                         "localhost:12345, or process 0's IP address and a free port)")
    return host.strip("[]"), int(port)


def check_process_flags(coordinator_address: str | None, num_processes: int | None,
                        process_id: int | None) -> None:
    """Raises a ValueError naming the flag unless the three are all given, consistently, or
    all left out (the environment supplies them on a TPU VM)."""
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if missing and len(missing) < 3:
        raise ValueError(f"{', '.join(missing)} missing: give --coordinator_address, "
                         "--num_processes and --process_id together, or none of them (a TPU "
                         "VM's environment supplies them)")
    if missing:
        return
    parse_address(coordinator_address)
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} is out of range for --num_processes="
                         f"{num_processes}: ids run from 0 to {num_processes - 1}")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once something accepts connections at `address`; raises
    `CoordinatorUnreachableError` naming it after `timeout_s`."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise CoordinatorUnreachableError(
                    f"The coordinator at --coordinator_address={address} did not answer within "
                    f"{timeout_s:g} s ({error.strerror or error}). Start process 0 with the "
                    "same address, and check that its host and port are reachable from this "
                    "machine.") from None
            time.sleep(0.2)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, num_cpu_devices: int | None = None,
               timeout_s: int = 300) -> None:
    """`jax.distributed.initialize` with checked arguments and errors that name the address.

    Call it before anything touches a device. With no arguments the environment (a TPU VM,
    Slurm) supplies them. CPU processes get `num_cpu_devices` fake devices each and gloo
    collectives. A process that has not connected to all the others within `timeout_s` exits
    with a message naming the coordinator, not JAX's bare 'Deadline Exceeded' abort.
    """
    check_process_flags(coordinator_address, num_processes, process_id)
    if num_cpu_devices is not None and num_cpu_devices < 1:
        raise ValueError(f"--num_cpu_devices={num_cpu_devices} must be at least 1")
    if process_id:  # Not process 0, which hosts the coordinator.
        wait_for_coordinator(coordinator_address, timeout_s)
    if num_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
    # Only the CPU backend reads it: CPU processes' collectives go over TCP.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = coordinator_address or "the address the environment gives"
    count = f"{num_processes} processes" if num_processes else "the other processes"

    def give_up():
        sys.stderr.write(
            f"\nProcess {process_id if process_id is not None else '?'} could not connect to "
            f"{count} through the coordinator at {where} within {timeout_s} s: start every "
            "process with the same --coordinator_address and --num_processes and a distinct "
            "--process_id, and check that the address is reachable from every host.\n")
        sys.stderr.flush()
        os._exit(1)  # The main thread is blocked inside JAX's client; it cannot be raised into.

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s + 60)
    finally:
        watchdog.cancel()
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # Gloo gives every process 30 s to join a collective's first use; the processes are in
        # step now, so its context over all devices is made here, not wherever they first meet.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("xmem_jax_started")


# ---------------------------------------------------------------------------------------------
# Coordination.


def is_primary() -> bool:
    return jax.process_index() == 0


def _client():
    from jax._src import distributed  # Orbax's barriers use the same client.

    return distributed.global_state.client


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches the barrier `name` (a no-op in one process)."""
    if jax.process_count() == 1:
        return
    client = _client()
    key = f"xmem_jax/{name}/{next(_barrier_ids)}"
    if client is None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(key)
        return
    client.wait_at_barrier(key, timeout_in_ms=int(timeout_s * 1000))


def _share(name: str, value: str) -> list[str]:
    """Every process's `value`, in process order (through the coordinator's key-value store)."""
    client = _client()
    key = f"xmem_jax/{name}/{next(_barrier_ids)}"
    client.key_value_set(f"{key}/{jax.process_index()}", "=" + value)  # Never empty.
    return [client.blocking_key_value_get(f"{key}/{k}", BARRIER_TIMEOUT_S * 1000)[1:]
            for k in range(jax.process_count())]


def on_primary(fn: Callable[..., Any], *args, **kwargs) -> None:
    """Runs `fn(*args, **kwargs)` on process 0 only (writing a shared file); the others wait
    until it has finished, so nobody reads a half-written file or writes it twice."""
    primary_first(lambda: fn(*args, **kwargs), lambda: None, getattr(fn, "__name__", "write"))


def primary_first(build: Callable[[], T], after: Callable[[], T] | None = None,
                  what: str = "build") -> T:
    """`build()` on process 0, then `after()` (default `build`) on the others once it is done:
    a cache that process 0 builds and the others then read. If process 0 fails, every process
    raises, the others naming process 0's error."""
    if jax.process_count() == 1:
        return build()
    if is_primary():
        try:
            result = build()
        except BaseException as error:
            _share(f"{what}/done", f"{type(error).__name__}: {error}"[:2000])
            raise
        _share(f"{what}/done", "")
        return result
    failure = _share(f"{what}/done", "")[0]
    if failure:
        raise RuntimeError(f"Process 0 failed ({what}): {failure}")
    return (after or build)()


def check_shared(directories: Mapping[str, epath.PathLike]) -> None:
    """Raises on every process, naming the directory, unless each of `directories` ({flag or
    field: path}) is one directory that all processes see: process 0 writes a file there and
    the others must read it back. Processes writing into private copies would each keep a
    partial run (checkpoints, caches) and report nothing."""
    if jax.process_count() == 1:
        return
    paths = {name: str(path) for name, path in directories.items()}
    token = uuid.uuid4().hex if is_primary() else ""
    token, primary_paths = json.loads(_share("shared_token", json.dumps([token, paths]))[0])
    markers = {name: epath.Path(path) / f".xmem_shared_{token}" for name, path in paths.items()}
    if is_primary():
        for marker in markers.values():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(token)
    barrier("shared_written")
    unseen = {name: path for name, path in paths.items()
              if not (markers[name].exists() and markers[name].read_text() == token)}
    reports = [json.loads(r) for r in _share("shared_seen", json.dumps(unseen))]
    barrier("shared_read")
    if is_primary():
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    problems = [f"process {k} does not see the file process 0 wrote in {name}="
                f"{primary_paths[name]} (its {name} is {path})"
                for k, report in enumerate(reports) for name, path in report.items()]
    if problems:
        raise RuntimeError(
            f"The processes do not share their directories: {'; '.join(problems)}. Every "
            "process must read and write the same directory, e.g. a network filesystem or a "
            "gs:// bucket; separate local directories would each hold part of the run.")


def check_batch_sizes(config: Any, process_count: int) -> None:
    """Raises a ValueError naming every global batch size of `config` that does not split
    evenly over `process_count` processes, before any data or model is built: the
    `batch_size` of each training section (a section with `num_steps`) and every
    `*eval_batch_size`."""
    if process_count == 1:
        return
    bad = [(name, value) for name, value in _batch_fields(config, "config")
           if value % process_count]
    if bad:
        fields = ", ".join(f"{name}={value}" for name, value in bad)
        example = bad[0][1] + process_count - bad[0][1] % process_count
        raise ValueError(
            f"{fields} not divisible by the {process_count} processes: each process reads "
            f"batch_size / {process_count} rows of every global batch. Use multiples of "
            f"{process_count} (e.g. {bad[0][0]}={example}).")


def _batch_fields(config: Any, prefix: str) -> Iterable[tuple[str, int]]:
    items = list(config.items()) if hasattr(config, "items") else []
    training = any(key == "num_steps" for key, _ in items)
    for key, value in items:
        name = f"{prefix}.{key}"
        if hasattr(value, "items"):
            yield from _batch_fields(value, name)
        elif isinstance(value, int) and ((key == "batch_size" and training)
                                         or key.endswith("eval_batch_size")):
            yield name, value

