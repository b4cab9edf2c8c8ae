"""A gs:// bucket backed by a local directory, for tests: every client the project's files reach
a bucket through is pointed at the same directory.

- epath (and so the project's own reads and writes, TFDS's metadata, JAX's compilation cache,
  Orbax's metadata and TensorBoard's event files): fsspec's `gs` protocol is an fsspec file
  system over the directory that behaves as a bucket does where the code relies on it: folders
  exist only while they hold a file, making one does nothing, and moving one copies its files
  then deletes them.
- ArrayRecord's reader, which opens gs:// shards itself through Google's C++ storage client: a
  loopback HTTP server answering the JSON API's media downloads (with byte ranges), found
  through CLOUD_STORAGE_EMULATOR_ENDPOINT, as array_record's own tests do.
- Orbax's array data (TensorStore's gcs driver) and its bucket-only calls (the hierarchical
  namespace check, deletion): patched onto the directory (TensorStore's file driver, epath).

Not exercised: Google's authentication, TensorStore's gcs driver and gcsfs's network code.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.parse
from http import server

import fsspec
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry


class BucketFileSystem(DirFileSystem):
    """fsspec's `gs` protocol over the local directory `root` (set by `bucket`)."""

    protocol = ("gs", "gcs")
    cachable = False
    root = None

    def __init__(self, **kwargs):  # gcsfs's options (finalize_on_close, ...) do not apply.
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))

    def mkdir(self, path, create_parents=True, **kwargs):
        pass  # A bucket has no folders: one appears with its first object.

    def makedirs(self, path, exist_ok=False):
        pass

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        self.copy(path1, path2, recursive=recursive)  # Object by object, as gcsfs moves.
        self.rm(path1, recursive=recursive)

    def rm(self, path, *args, **kwargs):
        super().rm(path, *args, **kwargs)
        self._drop_empty_folders(path)

    def rm_file(self, path, **kwargs):
        super().rm_file(path, **kwargs)
        self._drop_empty_folders(path)

    def _drop_empty_folders(self, paths):
        for path in [paths] if isinstance(paths, str) else paths:
            folder = os.path.dirname(self._join(path))
            while folder.startswith(self.root + os.sep) and os.path.isdir(folder):
                if os.listdir(folder):
                    break
                os.rmdir(folder)
                folder = os.path.dirname(folder)


class MediaServer:
    """Answers `GET /storage/v1/b/<bucket>/o/<object>?alt=media` with the file
    `<root>/<bucket>/<object>`, honouring Range headers; counts the requests."""

    def __init__(self):
        self.root = None
        self.requests = []
        outer = self

        class Handler(server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    pass  # The reader closes a stream once it has the bytes it wanted.

            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                match = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", url.path)
                path = match and os.path.join(outer.root, match[1], urllib.parse.unquote(match[2]))
                if not path or not os.path.isfile(path):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                outer.requests.append(path)
                with open(path, "rb") as file:
                    data = file.read()
                start, end = 0, len(data) - 1
                wanted = self.headers.get("Range", "")
                if tail := re.fullmatch(r"bytes=-(\d+)", wanted):
                    start = max(0, len(data) - int(tail[1]))
                elif span := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted):
                    start, end = int(span[1]), min(end, int(span[2] or end))
                body = data[start:end + 1]
                self.send_response(206 if wanted else 200)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                self.wfile.write(body)

        self._server = server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"

    def close(self):
        self._server.shutdown()
        self._server.server_close()


def install(monkeypatch, root: str, media: MediaServer) -> None:
    """Points every bucket client at `root` for the rest of the test."""
    from orbax.checkpoint._src.path import gcs_utils

    BucketFileSystem.root = root
    media.root = root
    for protocol in BucketFileSystem.protocol:
        fsspec.register_implementation(protocol, BucketFileSystem, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", media.endpoint)

    def local_kvstore(path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, bucket, key)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", local_kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(gcs_utils, "rmtree", lambda path, missing_ok=False:
                        epath.Path(path).rmtree(missing_ok=missing_ok))


def uninstall() -> None:
    for protocol in BucketFileSystem.protocol:  # Back to gcsfs, found by name when next asked.
        fsspec_registry.pop(protocol, None)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
