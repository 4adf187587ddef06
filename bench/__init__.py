"""Benchmarks for embserve: `python -m bench COMMAND` (bench/cli.py); studies apart in bench/studies/."""
