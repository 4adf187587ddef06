"""bench ov-forward: it finds the IR of the cache entry that the model's runtime reason names, loaded or converted."""

from __future__ import annotations

from pathlib import Path

from bench.studies.ov_forward import ir_of


def test_the_ir_is_found_whether_the_entry_was_read_or_written_now():
    read = "auto: a CPU, and openvino is installed; cached IR /c/embserve/openvino/ab12, bf16 precision, 2 streams"
    written = "set; converted, cached as /c/embserve/openvino/cd34, f32 precision, 1 streams"
    assert ir_of(read) == Path("/c/embserve/openvino/ab12/model.xml")
    assert ir_of(written) == Path("/c/embserve/openvino/cd34/model.xml")
    assert ir_of("auto: a CPU; converted (no cache), bf16 precision, 2 streams") is None
