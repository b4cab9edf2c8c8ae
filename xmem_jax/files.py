"""Where a run's files live: a local directory or a bucket (gs://...).

Every path that names a workdir, a cache, a dataset or an output is an `etils.epath.Path`, whose
backends read and write both (a bucket through fsspec's gcsfs); no code opens such a path with
`open()`, `os.path` or `pathlib`. A bucket is not a disk: an object appears whole once its upload
finishes and cannot be appended to, a folder exists only while it holds an object, renaming a
folder copies its objects one by one, and nothing can be locked. The functions here serve
libraries that open files themselves and accept only local ones.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from typing import Any, Iterator

from etils import epath


def is_local(path: epath.PathLike) -> bool:
    """Whether `path` is on this machine's filesystem, not in a bucket (gs://, s3://, ...)."""
    return "://" not in str(path)


def write_text_atomically(path: epath.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file renamed into place, so a crash leaves
    the old file or none, never a truncated one that looks complete."""
    path = epath.Path(path)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    temporary.write_text(text)
    temporary.replace(path)  # Overwrites: a rerun or a second writer replaces the file.


def move(source: epath.PathLike, target: epath.PathLike) -> None:
    """Moves the file `source` to `target`, replacing it: a rename on a local disk; in a
    bucket a copy, then the source deleted (epath's rename there wants the target's folder to
    hold an object already, and a bucket copies to rename anyway)."""
    source, target = epath.Path(source), epath.Path(target)
    if is_local(source) and is_local(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        source.replace(target)
    else:
        source.copy(target, overwrite=True)
        source.unlink()


@contextlib.contextmanager
def staged_file(path: epath.PathLike) -> Iterator[epath.Path]:
    """A local file to write instead of `path`, put at `path` whole when the block ends: for
    writers that open only local files (ArrayRecord's). On a local disk it is renamed into
    place; to a bucket it is uploaded as one object. A failure leaves no partial `path`."""
    path = epath.Path(path)
    if is_local(path):
        staged = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            yield staged
            staged.replace(path)
        finally:
            staged.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="xmem_stage_") as local:
        staged = epath.Path(local) / path.name
        yield staged
        staged.copy(path, overwrite=True)


@contextlib.contextmanager
def staged_directory(directory: epath.PathLike) -> Iterator[epath.Path]:
    """An empty local directory whose files are copied into `directory` when the block ends:
    for libraries that save into local folders (a Hugging Face tokenizer's `save_pretrained`)."""
    with tempfile.TemporaryDirectory(prefix="xmem_stage_") as local:
        yield epath.Path(local)
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for file in epath.Path(local).iterdir():
            file.copy(directory / file.name, overwrite=True)


@contextlib.contextmanager
def local_directory(directory: epath.PathLike) -> Iterator[epath.Path]:
    """`directory` itself on a local disk; from a bucket, a temporary local copy of its files:
    for libraries that read only local folders (Hugging Face's `from_pretrained`)."""
    directory = epath.Path(directory)
    if is_local(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="xmem_copy_") as local:
        for file in directory.iterdir():
            if not file.is_dir():
                file.copy(epath.Path(local) / file.name)
        yield epath.Path(local)


def save_figure(figure: Any, path: epath.PathLike) -> None:
    """Saves a matplotlib figure to `path` as a PNG, through a file object (matplotlib would
    open a path itself)."""
    with epath.Path(path).open("wb") as file:
        figure.savefig(file, format="png", dpi=110)
