"""docs/benchmarks.md: a new bench.run replaces its own part and keeps the other benches' sections."""

from pathlib import Path

from bench.page import KEEP, with_kept_sections

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def test_a_new_run_replaces_the_generated_part_and_keeps_what_lies_below_the_line():
    old = f"# Benchmarks\n\nold figures\n\n{KEEP}\n\n## Bulk embedding, 2026-11-30\n\n137.6 texts/s\n"
    new = with_kept_sections("# Benchmarks\n\nnew figures\n", old)
    assert new == f"# Benchmarks\n\nnew figures\n\n{KEEP}\n\n## Bulk embedding, 2026-11-30\n\n137.6 texts/s\n"
    assert with_kept_sections("# Benchmarks\n\nnew figures\n", new) == new  # a second run changes nothing


def test_a_page_without_the_line_gets_it_and_keeps_nothing_of_the_old_page():
    assert with_kept_sections("# B\n", "# B\n\nold\n") == f"# B\n\n{KEEP}\n"
    assert with_kept_sections("# B\n", None) == f"# B\n\n{KEEP}\n"


def test_the_shipped_page_has_the_line_above_the_other_benches_sections():
    text = DOCS.read_text()
    assert text.count(KEEP) == 1
    generated, kept = text.split(KEEP)
    assert "## Reproduce" in generated
    for section in ("## Bulk embedding", "bench.ab", "bench.soak", "bench.peers"):
        assert section in kept and section not in generated.split("## Reproduce")[0]
