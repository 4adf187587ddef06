"""bench.ab drives every arm with this checkout's load generator, so that arms differ in the server only."""

from pathlib import Path

from bench.ab import LOAD_GENERATOR, ROOT, give_load_generator


def test_an_older_checkout_gets_this_checkouts_load_generator(tmp_path: Path):
    older = tmp_path / "older"
    (older / "bench").mkdir(parents=True)
    (older / "bench" / "load.py").write_text("import httpx  # the old client\n")
    give_load_generator(older)
    for name in LOAD_GENERATOR:  # replaced where it was, added where it was not
        assert (older / name).read_bytes() == (ROOT / name).read_bytes()
    assert "http_client" in (older / "bench" / "load.py").read_text()
