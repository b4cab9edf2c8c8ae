"""The main job: runs the experiment a config describes, resuming in --workdir.

    python -m xmem_jax.main --config=configs/default.py --workdir=runs/default
"""

import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Results and checkpoints; reruns resume here.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False,
                                  "Call jax.distributed.initialize() first (multi-host TPU "
                                  "slices; launch_tpu/launch.sh sets it).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize()  # Before any device is touched.
    from xmem_jax import experiments  # After flag parsing: Grain workers re-import main.

    experiments.use_compilation_cache(_CONFIG.value.get("cache_dir"))
    command = "python -m xmem_jax.main " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    experiments.run(_CONFIG.value, _WORKDIR.value, command)
    print(f"Results in {_WORKDIR.value}: results.json, report.md and plots")


if __name__ == "__main__":
    app.run(main)
