"""Benchmarks: speculative vs plain decoding of one bundle (run), the synthetic cost model
(synthetic), and their tables and SVG plots (report, svg)."""
