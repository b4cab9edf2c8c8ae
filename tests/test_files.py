"""Run files in a local directory or a gs:// bucket, through one path type (`etils.epath.Path`).

The bucket is `fake_bucket`'s: gs:// paths backed by a local directory, reached through the same
clients as a real bucket (epath and fsspec, ArrayRecord's GCS reader over HTTP, Orbax). The
quick study in it proves that every file of a run reaches the bucket and that nothing touches
the local disk; the source check proves that no module opens a run's paths any other way.
"""

import ast
import json
from pathlib import Path

import pytest
from etils import epath

import fake_bucket
from conftest import small_data_config
from data_gen import dataset as data_writer
from xmem_jax import files
from xmem_jax.data import source
from xmem_jax.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
BUCKET = "gs://xmem-test"


@pytest.fixture(scope="module")
def media_server():
    server = fake_bucket.MediaServer()
    yield server
    server.close()


@pytest.fixture()
def bucket(tmp_path, monkeypatch, media_server):
    """The local directory that holds the fake bucket gs://xmem-test (as `<root>/xmem-test`)."""
    root = tmp_path / "bucket"
    root.mkdir()
    fake_bucket.install(monkeypatch, str(root), media_server)
    yield root
    fake_bucket.uninstall()


@pytest.fixture(params=["local", "bucket"])
def directory(request, tmp_path):
    """A directory of each kind: a local one, and one in the fake bucket."""
    if request.param == "local":
        return epath.Path(tmp_path / "local")
    request.getfixturevalue("bucket")
    return epath.Path(BUCKET) / "dir"


def test_atomic_writes_replace_an_existing_file(directory):
    """A rerun (or a second run sharing a base) rewrites results files in place."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results.json"
    files.write_text_atomically(path, "first")
    files.write_text_atomically(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in directory.iterdir()] == ["results.json"]  # No temporary left.


def test_a_staged_file_arrives_whole_or_not_at_all(directory):
    directory.mkdir(parents=True, exist_ok=True)
    with files.staged_file(directory / "shard") as staged:
        assert files.is_local(staged)
        with open(staged, "wb") as file:  # As a writer of local files only would.
            file.write(b"records")
    assert (directory / "shard").read_bytes() == b"records"
    with pytest.raises(KeyboardInterrupt):
        with files.staged_file(directory / "broken") as staged:
            staged.write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in directory.iterdir()) == ["shard"]


def test_staged_and_local_directories_round_trip(directory):
    with files.staged_directory(directory / "tokenizer") as local:
        (local / "tokenizer.json").write_text("{}")
    assert (directory / "tokenizer" / "tokenizer.json").read_text() == "{}"
    with files.local_directory(directory / "tokenizer") as local:
        assert files.is_local(local)
        assert (local / "tokenizer.json").read_text() == "{}"


def test_dataset_in_a_bucket_is_written_and_read_there(bucket, media_server,
                                                       persona_dataset_dir):
    """data_gen writes into the bucket (ArrayRecord shards staged locally, then uploaded);
    the reader opens the shards with ArrayRecord's own GCS reader."""
    path = data_writer.generate(small_data_config(), f"{BUCKET}/data")
    assert str(path) == f"{BUCKET}/data/xmem_personas/{source.schema.VERSION}"
    assert not (bucket / "xmem-test" / "data" / "xmem_personas" /
                f"{source.schema.VERSION}.incomplete").exists()
    media_server.requests.clear()
    in_bucket, local = source.open_dataset(f"{BUCKET}/data"), source.open_dataset(
        persona_dataset_dir)
    assert [in_bucket[i] for i in range(len(local))] == [local[i] for i in range(len(local))]
    assert media_server.requests and all(r.startswith(str(bucket)) for r in media_server.requests)
    tokenizer = load_tokenizer(in_bucket.tokenizer_dir)
    assert tokenizer.get_vocab() == load_tokenizer(local.tokenizer_dir).get_vocab()


def test_sweep_outputs_and_points_in_a_bucket(bucket):
    from test_sweep import FakeRun, fake_sweep_config
    from xmem_jax import sweep

    workdir = f"{BUCKET}/sweep"
    config = fake_sweep_config()
    config.experiment.cache_dir = f"{BUCKET}/cache"  # A bucket has no lock: it warns.
    sweep.run_point(config, 1, workdir, "test", run_fn=FakeRun(), build_fn=lambda c: None)
    rows, missing = sweep.aggregate(config, workdir, "test")
    assert [row["name"] for row in rows] == ["p1"] and missing == ["p0"]
    run = FakeRun()
    sweep.run_sweep(config, workdir, "test", run_fn=run)
    assert len(run.commands) == 1  # The point already in the bucket is read back.
    assert "to run" not in sweep.list_points(config, workdir)
    written = bucket / "xmem-test" / "sweep"
    assert len(json.loads((written / "sweep.json").read_text())) == 2
    assert (written / "sweep.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_quick_study_in_a_bucket_leaves_nothing_on_the_local_disk(bucket, media_server,
                                                                  tmp_path, monkeypatch):
    """The workdir and cache_dir in the bucket: the dataset, the base model, checkpoints,
    metrics.jsonl, TensorBoard events, results.json, report.md, curves.png and JAX's compiled
    programs all land there; the working directory and the temporary directory stay empty; a
    rerun resumes from the bucket."""
    import jax
    from jax._src import compilation_cache

    from test_study import quick_config
    from test_train import _event_scalars
    from xmem_jax import experiments
    from xmem_jax.experiments import study

    work, temporary = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temporary.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr("tempfile.tempdir", str(temporary))
    config = quick_config(tmp_path, cache_dir=f"{BUCKET}/cache", control=False)
    config.base.num_steps = 2
    config.base.optim.warmup_steps = 1
    config.finetune.num_steps = 2
    config.finetune.optim.warmup_steps = 0
    config.eval_every = 1
    cache_options = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in cache_options}
    compilation_cache.reset_cache()
    try:
        experiments.use_compilation_cache(config.cache_dir)
        results = study.run(config, f"{BUCKET}/run", "test")
        again = study.run(config, f"{BUCKET}/run", "test")
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()

    assert list(work.iterdir()) == [] and list(temporary.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bucket", "cwd", "tmp"]
    root = bucket / "xmem-test"
    run, cache = root / "run", root / "cache"
    saved_results = json.loads((run / "results.json").read_text())
    assert saved_results["recall"] == results["recall"] == again["recall"]
    assert [p["step"] for p in saved_results["curves"]] == [0, 1, 2]
    assert "Pixel lookup" in (run / "report.md").read_text()
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")
    seed_dir = run / "finetune" / "seed_0"
    assert [json.loads(line)["step"] for line in (seed_dir / "metrics.jsonl").read_text(
        ).splitlines() if json.loads(line)["kind"] == "eval"] == [0, 1, 2]
    scalars = _event_scalars(f"{BUCKET}/run/finetune/seed_0/tensorboard")
    assert {step for step, _ in scalars["eval/image/choice_acc"]} == {0, 1, 2}
    assert scalars["train/loss"]
    assert any((seed_dir / "checkpoints").iterdir())
    (data_dir,) = (cache / "data").iterdir()
    assert (data_dir / "xmem_personas" / source.schema.VERSION / "dataset_info.json").exists()
    assert media_server.requests  # The shards were read from the bucket.
    (base,) = (cache / "base").iterdir()
    assert list(base.glob("base_recall_*.json")) and any((base / "checkpoints").iterdir())
    assert any((cache / "xla").iterdir())  # JAX's compilation cache.


# Modules that open local files that are never a run's: the repository's own (docs, the
# checkout the launcher packs or provenance reads) and pretrained model folders, which
# safetensors and diffusers read from a local disk.
LOCAL_ONLY = {
    "xmem_jax/launch.py": "packs the local checkout and runs gcloud",
    "xmem_jax/provenance.py": "reads the checkout's git state",
    "xmem_jax/report/docs.py": "renders the repository's docs",
    "xmem_jax/model/hf.py": "Hugging Face checkpoint folders, read by safetensors",
    "data_gen/render/diffusion.py": "a diffusion model folder",
}
OS_FILE_CALLS = {"makedirs", "mkdir", "replace", "rename", "remove", "unlink", "listdir",
                 "rmdir", "scandir", "walk", "stat"}


def direct_file_access(tree: ast.AST) -> list[str]:
    """What in a module's syntax tree reaches files without epath: pathlib, builtin open(),
    os.path and os's file functions, shutil."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name in ("pathlib", "shutil")]
        elif isinstance(node, ast.ImportFrom) and node.module in ("pathlib", "shutil", "os.path"):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "open":
            found.append(f"open() on line {node.lineno}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == "os" and (node.attr == "path" or node.attr in OS_FILE_CALLS):
            found.append(f"os.{node.attr} on line {node.lineno}")
    return found


def test_no_module_opens_a_run_path_without_epath():
    modules = sorted(p for package in ("xmem_jax", "data_gen")
                     for p in (REPO / package).rglob("*.py"))
    offenders = {}
    for module in modules:
        name = str(module.relative_to(REPO))
        found = direct_file_access(ast.parse(module.read_text()))
        if found and name not in LOCAL_ONLY:
            offenders[name] = found
    assert not offenders, ("Open run files through etils.epath.Path (xmem_jax.files stages "
                           f"them for libraries that need local files): {offenders}")
    assert direct_file_access(ast.parse("import pathlib\nopen('x')\nos.path.join('a')")) == [
        "import pathlib", "open() on line 2", "os.path on line 3"]
    for name in LOCAL_ONLY:  # Each exception still exists and still needs to be one.
        assert direct_file_access(ast.parse((REPO / name).read_text())), name
