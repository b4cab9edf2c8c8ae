"""Checkpoints: model, optimizer state, step and the input iterator's position, saved together.

One Orbax `CheckpointManager` step directory holds two items:

    <directory>/<step>/state/   the train state (`nnx.State` of model + optimizer, step included)
    <directory>/<step>/data/    the Grain iterator state, one JSON file per process

so a resumed run continues the exact data stream it stopped in. Every process of a run writes
its part of each checkpoint (Orbax), and a checkpoint restores under another process count: its
arrays are resharded onto the new mesh, and the iterator states, which count global batches
(`xmem_jax.data.pipeline`), are the same in every process. Saves are asynchronous (the
arrays are copied off the devices, then written in the background) and atomic (written to a
temporary directory, renamed when complete), so a job killed mid-save leaves the previous
checkpoint as the latest. On multi-host runs, Orbax also saves at a preemption sync point
(`should_save`).

Restores fill an abstract state carrying `NamedSharding`s (`sharding.abstract_model`), so each
host reads only its own shards. Before reading, the stored shapes are checked against the
target, so a workdir from another model fails with the parameter and both shapes named; a
checkpoint that cannot be read is set aside (renamed `<step>.corrupt`) with a warning, and the
previous one is tried.

Config (`config.checkpoint`, `default_config()`):

| field | meaning |
| --- | --- |
| `every_steps` | save every this many steps (and always at the end of training); 0 = only at the end |
| `max_to_keep` | keep the newest this many checkpoints; None = all |
| `async_save` | write in the background while training continues |
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from xmem_jax import files
from xmem_jax.train.optim import path_name

_STATE, _DATA = "state", "data"


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.every_steps = 1000
    config.max_to_keep = 3
    config.async_save = True
    return config


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written by a model with other parameter names or shapes."""


def is_checkpointable(iterator: Any) -> bool:
    """Whether the iterator's position can be saved (a Grain `DatasetIterator` or alike)."""
    return hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'/'-joined path -> shape, for an abstract state or Orbax's stored metadata tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    shapes = {}
    for path, leaf in leaves:
        name = path_name(path)
        if name.endswith("/value"):  # Orbax stores a Variable as {'value': array}.
            name = name[: -len("/value")]
        shapes[name] = tuple(leaf.shape)
    return shapes


def check_compatible(stored: Any, target: Any, where: str) -> None:
    """Raises `IncompatibleCheckpointError` naming the first parameters that differ."""
    stored, target = _shapes(stored), _shapes(target)
    hint = ("Use a new workdir for a different model, or restore the model config the "
            "checkpoint was trained with.")
    for name, shape in target.items():
        if name in stored and stored[name] != shape:
            raise IncompatibleCheckpointError(
                f"Checkpoint {where} does not fit this model: {name} has shape {stored[name]} "
                f"in the checkpoint but {shape} in the model. {hint}")
    missing = sorted(set(target) - set(stored))
    unexpected = sorted(set(stored) - set(target))
    if missing or unexpected:
        raise IncompatibleCheckpointError(
            f"Checkpoint {where} does not fit this model: parameters missing from the checkpoint: "
            f"{missing[:5] or 'none'}; in the checkpoint but not in the model: "
            f"{unexpected[:5] or 'none'}. {hint}")


def _summary(error: Exception, limit: int = 300) -> str:
    """The error's type and the start of its message (tensorstore appends kilobytes of spec)."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + "..."


class _DataHandler(grain_checkpoint.CheckpointHandler):
    """Grain's iterator handler (one `process_<i>-of-<n>.json` per process) for any iterator
    whose get_state / set_state take a JSON-able state (a Grain `DatasetIterator`, or one
    wrapping it), restoring under another process count too: a process with no file of its
    own takes the state that every process of the saving run agreed on."""

    def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
        item = item or args.item
        state = item.get_state()  # A Grain DataLoader's state is JSON already, as bytes.
        text = state.decode() if isinstance(state, bytes) else json.dumps(state, indent=4)
        (directory / _state_file(jax.process_index(), jax.process_count())).write_text(text)

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
        item = item or args.item
        own = directory / _state_file(jax.process_index(), jax.process_count())
        if own.exists():
            states = {own.read_text()}
        else:
            saved = sorted(directory.glob("process_*-of-*.json"))
            states = {json.dumps(json.loads(path.read_text())) for path in saved}
            if len(states) != 1:
                raise ValueError(
                    f"{directory} holds no iterator state for process {jax.process_index()} "
                    f"of {jax.process_count()}, and the {len(saved)} saved ones "
                    f"({', '.join(p.name for p in saved) or 'none'}) differ, so none stands for "
                    "all: restore with the process count that saved it")
        state = states.pop()
        item.set_state(state.encode() if isinstance(item.get_state(), bytes)
                       else json.loads(state))
        if hasattr(item, "start_prefetch"):
            item.start_prefetch()
        return item


def _state_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    item: Any


class Checkpointer:
    """Saves and restores (train state, data iterator) pairs under one directory."""

    def __init__(self, directory: epath.PathLike, config: ml_collections.ConfigDict):
        directory = epath.Path(directory)  # Orbax needs absolute local paths.
        self.directory = directory.resolve() if files.is_local(directory) else directory
        self._config = config
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        every = int(self._config.every_steps)
        policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
        if every:
            policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(every))
        options = ocp.CheckpointManagerOptions(
            # Orbax's default policy would also save the first step of every run.
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
            max_to_keep=self._config.max_to_keep,
            enable_async_checkpointing=bool(self._config.async_save),
            create=True,
        )
        return ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                           _DATA: _DataHandler()})

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `step` is a save step or a preemption sync point (call on every host)."""
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """Whether the hosts reached a preemption sync point (pods; call on every host)."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, state: nnx.State, data_iterator: Any = None) -> None:
        """Starts saving `state` and the iterator's current position as `step`.

        The iterator's position is read before this returns; the arrays are written in the
        background (`wait_until_finished` blocks until they are on disk).
        """
        items = {_STATE: ocp.args.StandardSave(state)}
        if is_checkpointable(data_iterator):
            items[_DATA] = _DataSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: nnx.State, data_iterator: Any = None,
                ) -> tuple[int, nnx.State] | None:
        """Restores the newest readable checkpoint: (step, state), or None if there is none.

        `abstract_state` (ShapeDtypeStructs with shardings) says where each array goes. The
        iterator, if checkpointable, is moved to the saved position in place. Unreadable
        checkpoints are set aside with a warning once an older one restores; if none restores,
        nothing is renamed and a RuntimeError lists each failure.
        """
        failures: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            where = f"{self.directory / str(step)}"
            try:
                stored = self._manager.item_metadata(step)[_STATE]
                if stored is None:
                    raise ValueError("no readable state metadata")
                check_compatible(stored, abstract_state, where)
                items = {_STATE: ocp.args.StandardRestore(abstract_state)}
                has_data = (self.directory / str(step) / _DATA).exists()
                if is_checkpointable(data_iterator) and has_data:
                    items[_DATA] = _DataRestore(data_iterator)
                elif is_checkpointable(data_iterator):
                    logging.warning("Checkpoint %s has no data iterator state; the data stream "
                                    "restarts from its beginning", where)
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means "try the previous one".
                logging.warning("Checkpoint %s cannot be restored (%s); trying the previous "
                                "one", where, _summary(e))
                failures.append((step, e))
                continue
            if failures:
                self._set_aside([s for s, _ in failures])
            return step, restored[_STATE]
        if failures:
            listing = "; ".join(f"step {s}: {_summary(e)}" for s, e in failures)
            raise RuntimeError(
                f"No checkpoint in {self.directory} could be restored ({listing}). Move the "
                "directory away to start from scratch, or fix the cause above.") from failures[0][1]
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories to `<step>.corrupt` (kept for inspection, ignored
        by Orbax), so that new saves can reuse their step numbers."""
        if jax.process_index() == 0:
            for step in steps:
                path, aside = self.directory / str(step), self.directory / f"{step}.corrupt"
                suffix = 1
                while aside.exists():
                    aside, suffix = self.directory / f"{step}.corrupt{suffix}", suffix + 1
                path.rename(aside)
                logging.warning("Moved unreadable checkpoint %s to %s", path, aside)
        multihost_utils.sync_global_devices("xmem_jax_checkpoint_set_aside")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
