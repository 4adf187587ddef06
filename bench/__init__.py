"""Benchmarks for embserve: corpus, load generator, offline limit, and the one-command report (bench.run)."""
