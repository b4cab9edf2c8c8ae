"""Times loading a Hugging Face safetensors directory into our model.

    python benchmarks/load.py                  # a synthetic Gemma 3 1B directory (float32)
    python benchmarks/load.py --model_dir=DIR  # an existing one

The synthetic directory is written by this script (random tensors with Gemma 3 1B's shapes and
config.json, ~4 GB in float32) into a temporary folder and deleted afterwards. The last line is
`load_seconds: X`.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from xmem_jax.model import VLM, get_model_config, hf


def write_synthetic(name: str, out_dir: Path) -> int:
    """Random float32 weights with the preset's shapes, in the `save_pretrained` layout."""
    config = get_model_config(name, dtype=np.float32, param_dtype=np.float32)
    abstract = nnx.state(nnx.eval_shape(lambda: VLM(config, rngs=nnx.Rngs(0))), nnx.Param)
    shapes = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(abstract)}
    rng = np.random.default_rng(0)
    tensors, total = {}, 0
    for weight in hf.weight_table(config):
        value = rng.standard_normal(shapes[weight.ours], np.float32) * 0.02
        for key, tensor in hf.hf_tensors({weight.ours: value}, config, [weight]):
            tensors[key] = np.ascontiguousarray(tensor)
            total += tensor.size
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf.hf_config_dict(config)))
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="")
    parser.add_argument("--preset", default="gemma3_1b")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir or tmp)
        if not args.model_dir:
            start = time.perf_counter()
            count = write_synthetic(args.preset, model_dir)
            print(f"wrote {count:,} parameters ({sum(f.stat().st_size for f in model_dir.iterdir()) / 2**30:.2f} GiB) "
                  f"in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        model = hf.load_model(model_dir)
        jax.block_until_ready(nnx.state(model))
        seconds = time.perf_counter() - start
    print(f"load_seconds: {seconds:.1f}")


if __name__ == "__main__":
    main()
