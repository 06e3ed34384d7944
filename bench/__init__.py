"""tracekeeper's benchmarks: scripts that print comparison tables (never timed tests).

Run them all with `make bench` (bench/run.py), or one with `.venv/bin/python -m bench.<name>`.
"""
