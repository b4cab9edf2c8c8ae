"""The paper's experiments, each a module with `run(config, workdir, command) -> results`.

`config.experiment` picks one (the main job and the sweeps call `run` here):

    transfer     fine-tune on ONE modality, score recall in both (`study`, the default)
    directions   the transfer study trained on images, then on descriptions
    multihop     image/description -> name taught in one modality, name -> fact in text;
                 score image -> fact and description -> fact
    unlearning   fine-tune on both modalities, unlearn a forget set through one
    mitigation   the transfer study with and without bridge personas / auxiliary tasks
    paper        all of the above in turn, then the findings table
    alignment    a probe: do image and description states of a persona match, per layer?
"""

from __future__ import annotations

import importlib

import ml_collections
from etils import epath

EXPERIMENTS = {"transfer": ("study", "run"), "directions": ("study", "run_directions"),
               "multihop": ("multihop", "run"), "unlearning": ("unlearning", "run"),
               "mitigation": ("mitigation", "run"), "paper": ("paper", "run"),
               "alignment": ("alignment", "run")}


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str) -> dict:
    name = config.get("experiment", "transfer")
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r} (config.experiment); known: "
                         f"{', '.join(EXPERIMENTS)}")
    module, function = EXPERIMENTS[name]
    module = importlib.import_module(f"xmem_jax.experiments.{module}")
    return getattr(module, function)(config, workdir, command)


def use_compilation_cache(cache_dir: str | None) -> None:
    """Keeps compiled XLA programs in `<cache_dir>/xla` (JAX's persistent compilation cache), so
    a rerun, or another run sharing the cache, loads them instead of compiling again: ~30 s of
    a cached default run on a CPU. A bucket works too (JAX reads it through epath). Call it
    before anything compiles; '' or None: no cache."""
    if not cache_dir:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(epath.Path(cache_dir) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
