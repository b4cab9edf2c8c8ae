"""One process of a multi-process training run for tests/test_multihost.py.

Trains a small VLM on a persona dataset with `trainer.train`, as the main job does: this
process's rows of each global batch from the pipeline, checkpoints every 2 steps. With
--kill_at_step=K the process kills itself (SIGKILL, no cleanup) when asked for batch K + 1,
once the checkpoint before it is on disk: a run killed mid-way.

    python tests/multihost_worker.py --workdir=... --data_dir=... [--coordinator_address=...
        --num_processes=2 --process_id=K] --num_cpu_devices=4 [--kill_at_step=3]
        [--compilation_cache=DIR]
"""

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NUM_STEPS, EVERY = 6, 2


class KillAt:
    """Delegates to a Grain iterator; SIGKILLs this process when batch `step + 1` is asked for,
    after the checkpoint at the last multiple of EVERY is finalized (Orbax renames it into
    place when complete)."""

    def __init__(self, iterator, step: int, checkpoints: Path):
        self.iterator, self.step, self.checkpoints, self.taken = iterator, step, checkpoints, 0

    def __next__(self):
        if self.taken == self.step:
            saved = self.checkpoints / str(self.step - self.step % EVERY)
            while not (saved / "_CHECKPOINT_METADATA").exists():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        self.taken += 1
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--num_cpu_devices", type=int, required=True)
    parser.add_argument("--kill_at_step", type=int, default=0)
    parser.add_argument("--compilation_cache", help="Shared by the runs of one process count.")
    args = parser.parse_args()

    import jax

    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    from xmem_jax import distributed

    if args.num_processes:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               num_cpu_devices=args.num_cpu_devices, timeout_s=120)
    else:
        jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)

    from flax import nnx

    from xmem_jax.data import pipeline
    from xmem_jax.model import VLM, get_model_config
    from xmem_jax.train import trainer

    tiny = get_model_config("tiny")  # Shrunk as in test_train: compiles in seconds.
    model = dataclasses.replace(
        tiny, mm_tokens_per_image=4,
        vision=dataclasses.replace(tiny.vision, width=32, depth=1, mlp_dim=64, num_heads=2),
        text=dataclasses.replace(tiny.text, vocab_size=640, embed_dim=32, mlp_dim=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                                 query_pre_attn_scalar=8, sliding_window=16))
    data = pipeline.default_config()
    data.data_dir = args.data_dir
    data.tasks = ["image_to_name", "description_to_name"]
    data.batch_size = 8
    data.max_length = 160
    # Two widths (image rows fit 80, descriptions 160): a process whose rows are all images
    # pads them to the other's width.
    data.length_bucket = 80
    data.image_size = model.vision.image_size
    data.num_image_tokens = model.mm_tokens_per_image
    data.augment_shift = 1
    config = trainer.default_config()
    config.num_steps = NUM_STEPS
    config.batch_size = 8
    config.mesh.fsdp = 2  # (data 4, fsdp 2): parameters sharded across the processes too.
    config.log_every = 1
    config.progress_bar = False
    config.optim.warmup_steps = 1
    config.checkpoint.every_steps = EVERY
    workdir = Path(args.workdir)
    iterator = iter(pipeline.build(data))
    if args.kill_at_step:
        iterator = KillAt(iterator, args.kill_at_step, workdir / "checkpoints")
    trainer.train(config, workdir, lambda: VLM(model, rngs=nnx.Rngs(0)), iterator)


if __name__ == "__main__":
    main()
