"""Benchmarks: `python -m bench` (or `make bench`). See README.md in this folder."""
