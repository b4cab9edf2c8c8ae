"""The README and docs/: the topic docs exist and are linked, every generated table equals what
the committed results render, and every relative link points at a file."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from xmem_jax.report import docs as report_docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
# [text](target) and [text]: target, outside code spans; images too.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|^\[[^\]]+\]:\s*(\S+)", re.M)


def _tpu_fit():
    """benchmarks/tpu_fit.py, imported once (it defines absl flags)."""
    name = "benchmarks_tpu_fit"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "tpu_fit.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _links(path: Path) -> list[str]:
    text = path.read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # Code blocks.
    text = re.sub(r"`[^`\n]*`", "", text)  # Code spans.
    return [a or b for a, b in LINK.findall(text)]


def test_readme_is_at_most_250_lines():
    """The README is for users: what xmem-jax does, how to run it, what it found; the rest is
    in docs/."""
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def test_topic_docs_exist_and_the_readme_links_each():
    for name in ("tpu.md", "checkpoints.md", "design.md", "data.md", "experiments.md",
                 "results.md", "history.md", "benchmarks.md"):
        assert (ROOT / "docs" / name).is_file(), name
    readme_links = {(ROOT / link.split("#")[0]).resolve()
                    for link in _links(ROOT / "README.md") if not re.match(r"\w+:", link)}
    unlinked = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in readme_links]
    assert not unlinked, f"README.md links none of {unlinked}"


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_point_at_files(path):
    broken = []
    for link in _links(path):
        if re.match(r"\w+:", link) or link.startswith("#"):  # URLs, mailto:, in-page anchors.
            continue
        target = (path.parent / link.split("#")[0]).resolve()
        if not target.exists():
            broken.append(link)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


def test_generated_blocks_equal_the_committed_results():
    tpu_fit = _tpu_fit()
    stale = tpu_fit.stale_blocks()
    assert not stale, (f"{stale} differ from what docs/results/ renders: run "
                       "`python benchmarks/tpu_fit.py --render_only`")
    stale = report_docs.stale_blocks()
    assert not stale, (f"{stale} differ from what docs/results/study/ renders: run "
                       "`python -m xmem_jax.report.docs`")


def test_report_docs_check_exits_0_on_the_committed_blocks(capsys):
    assert report_docs.main(["--check"]) == 0, capsys.readouterr().out


def test_every_marker_block_has_a_renderer():
    """A block's markers in a document no checker renders would go stale unnoticed."""
    known = set(_tpu_fit().BLOCKS) | set(report_docs.BLOCKS)
    for path in [ROOT / "README.md", *DOCS]:
        names = set(re.findall(r"<!-- ([\w-]+):begin -->", path.read_text()))
        assert names <= known, f"{path.relative_to(ROOT)}: no renderer for {names - known}"


def test_scoring_rss_with_one_count_has_no_empty_parentheses(tmp_path, monkeypatch):
    rss = tmp_path / "rss.json"
    rss.write_text('{"rows": [{"personas": 100, "queries": 200, "peak_rss_mib": 900.0}], '
                   '"record_cache_mb": 256, "command": "c", "commit": "abc1234"}')
    monkeypatch.setattr(report_docs, "SCORING_RSS", rss)
    text = report_docs.render_scoring_rss(tmp_path)
    assert "()" not in text and "900 MiB of host RSS, the pipeline's" in text


def test_persona_counts_prices_the_points_not_run_from_the_largest_run(tmp_path, monkeypatch):
    row = {"x": 1000.0, "source_choice_acc": 0.9, "target_choice_acc": 0.1,
           "target_mean_rank": 200.0, "chance_mean_rank": 500.5, "chance_choice_acc": 0.001,
           "evaluation_seconds": 60.0, "finetune_train_seconds": 720.0, "seconds": 1800.0,
           "commit": "abc1234"}
    counts = tmp_path / "persona_counts.json"
    counts.write_text(json.dumps({"rows": [row], "command": "c"}))
    monkeypatch.setattr(report_docs, "PERSONA_COUNTS", counts)
    text = report_docs.render_persona_counts(tmp_path)
    # 10^4 personas: 10x the steps (7,200 s) and 7 evaluations at 10x the time (4,200 s).
    assert "| 1,000 | 0.900 | 0.100 |" in text and "1,800 s |" in text
    assert "1,000 personas (" not in text.split("Not run:")[1]
    assert ("10,000 personas (30,000 fine-tuning steps, ~2.0 h of fine-tuning and ~1.2 h for "
            "its 7 evaluations here" in text)
