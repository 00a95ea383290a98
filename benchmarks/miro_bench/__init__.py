"""The sections of ``benchmarks/bench.py`` (run that script; this package is not installed)."""
