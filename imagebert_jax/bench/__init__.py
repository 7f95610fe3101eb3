"""Benchmarks: the model's steps (`python -m imagebert_jax.bench`, model.py), the input pipeline
(`python -m imagebert_jax.bench.data`) and the region-feature detector
(`python -m imagebert_jax.bench.detector`)."""
