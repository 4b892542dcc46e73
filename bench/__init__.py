"""Benchmarks: long experiments whose results go to bench/results/*.json (``licforge bench NAME``)."""
