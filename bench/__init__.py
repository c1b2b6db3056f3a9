"""Benchmarks of the pipeline (``python bench/run.py``); see bench/README.md."""
