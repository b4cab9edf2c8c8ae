"""Device memory of a train step, before renting the devices: lower and compile the step for a
model preset on a mesh (fake CPU devices do), print XLA's memory analysis per device.

    python -m xmem_jax.train.memory --model=gemma3_4b --mesh=1,8,1 --batch_size=8 \
        --seq_len=512 --lora_rank=16

Nothing is allocated: the state is abstract (`eval_shape`) and the step is only compiled. The
figures are XLA's for the CPU backend (argument, output, temporary and alias bytes); TPU and
GPU layouts differ a little, and a framework adds a few hundred MB.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "gemma3_4b", "A preset of xmem_jax.model.config.")
_MESH = flags.DEFINE_string("mesh", "1,8,1", "data,fsdp,tensor sizes.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per example (one image's included).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "LoRA rank; 0 = full fine-tuning.")
_FREEZE_VISION = flags.DEFINE_bool("freeze_vision", True, "Freeze the vision tower.")
_REMAT = flags.DEFINE_bool("remat", True, "Recompute layer activations in the backward pass.")


def estimate(model: str, mesh_shape: tuple[int, int, int], batch_size: int, seq_len: int,
             lora_rank: int = 0, freeze_vision: bool = True, remat: bool = True) -> dict:
    """Bytes per device of the compiled train step, and the parameter counts."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from xmem_jax.model import VLM, count_parameters, get_model_config, lora
    from xmem_jax.train import optim, sharding, trainer

    config = dataclasses.replace(get_model_config(model), remat=remat)
    devices = int(np.prod(mesh_shape))
    if len(jax.devices()) < devices:
        raise ValueError(f"--mesh={mesh_shape} needs {devices} devices; this process has "
                         f"{len(jax.devices())} (run with XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={devices})")
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:devices])
    train_config = trainer.default_config()
    train_config.batch_size = batch_size
    train_config.optim.warmup_steps = 0
    freeze = []
    if lora_rank:
        freeze.append(lora.FREEZE_ALL_BUT_ADAPTERS)
    elif freeze_vision and config.vision is not None:
        freeze.append(r"^(vision_tower|multi_modal_projector)/")
    train_config.optim.freeze_regex = "|".join(freeze)

    def model_fn():
        model = VLM(config, rngs=nnx.Rngs(0))
        if lora_rank:
            adapters = lora.default_config()
            lora.add_adapters(model, rank=lora_rank, alpha=adapters.alpha,
                              target_regex=adapters.target_regex)
        return model

    graphdef, abstract = sharding.abstract_model(trainer.train_state_fn(train_config, model_fn),
                                                 mesh)
    step = trainer.make_train_step(graphdef, train_config, sharding.state_shardings(abstract),
                                   mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, trainer.batch_partition())
    batch = {
        "tokens": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=batch_sharding),
        "input_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32,
                                           sharding=batch_sharding),
        "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32,
                                          sharding=batch_sharding),
    }
    if config.vision is not None:
        size = config.vision.image_size
        batch["images"] = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32,
                                               sharding=batch_sharding)
    with sharding.use_mesh(mesh):
        compiled = step.lower(abstract, batch, None).compile()
    analysis = compiled.memory_analysis()
    model_state = nnx.merge(graphdef, abstract).model
    figures = {
        "params": count_parameters(model_state),
        "trainable_params": count_parameters(model_state,
                                             optim.trainable_filter(train_config.optim)),
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
    }
    # Donated state is aliased: arguments + temporaries (+ outputs not aliased to inputs).
    figures["peak_bytes_per_device"] = (figures["argument_bytes"] + figures["temp_bytes"]
                                        + figures["output_bytes"] - figures["alias_bytes"])
    return figures


def main(argv):
    del argv
    mesh_shape = tuple(int(x) for x in _MESH.value.split(","))
    if len(mesh_shape) != 3:
        raise app.UsageError(f"--mesh={_MESH.value!r}: give data,fsdp,tensor")
    figures = estimate(_MODEL.value, mesh_shape, _BATCH.value, _SEQ_LEN.value, _LORA_RANK.value,
                       _FREEZE_VISION.value, _REMAT.value)
    mode = f"LoRA rank {_LORA_RANK.value}" if _LORA_RANK.value else "full fine-tuning"
    print(f"{_MODEL.value}, {mode}, mesh (data, fsdp, tensor) = {mesh_shape}, batch "
          f"{_BATCH.value} x {_SEQ_LEN.value} tokens, remat={_REMAT.value}:")
    print(f"  parameters {figures['params']:,} ({figures['trainable_params']:,} trainable)")
    for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                "peak_bytes_per_device"):
        print(f"  {key:24s} {figures[key] / 2**30:9.3f} GiB")


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        count = 8
        for arg in sys.argv:
            if arg.startswith("--mesh="):
                count = max(count, math.prod(int(x) for x in arg[7:].split(",")))
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={count}")
    app.run(main)
