"""Generates the persona dataset.

    python -m data_gen --config=configs/data/procedural.py --out_dir=data
"""

from absl import app, flags, logging
from ml_collections import config_flags

from data_gen import dataset

_CONFIG = config_flags.DEFINE_config_file("config", "configs/data/procedural.py",
                                          "Data config file.")
_OUT_DIR = flags.DEFINE_string("out_dir", "data", "Where the dataset directory is written.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    path = dataset.generate(_CONFIG.value, _OUT_DIR.value)
    if path is None:
        print(f"Shard written; the dataset under {_OUT_DIR.value} finalizes once every shard is.")
    else:
        print(f"Dataset written to {path}")


if __name__ == "__main__":
    app.run(main)
