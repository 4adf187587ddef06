"""docs/benchmarks.md is two parts: what `bench.run` generates, above the KEEP line, and the dated sections of
the other benches (bench.ab, bench.bulk, bench.soak, bench.peers), below it, each from its own run. A new
`bench.run` replaces the first part and keeps the second, so that no measured figure the docs cite is lost."""

from __future__ import annotations

KEEP = ("<!-- bench.run rewrites what is above this line and keeps what is below it: the dated sections of the "
        "other benches, each from its own run. -->")


def with_kept_sections(generated: str, old: str | None) -> str:
    """The generated page, then the KEEP line and whatever followed it in the page that this one replaces."""
    kept = old[old.index(KEEP) + len(KEEP):].strip("\n") if old and KEEP in old else ""
    return generated.rstrip("\n") + "\n\n" + KEEP + "\n" + (f"\n{kept}\n" if kept else "")
