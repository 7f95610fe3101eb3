#!/usr/bin/env python
"""`python tools/extract_features.py ...`: the region-feature extractor, imagebert_jax.detector.extract_features
(installed as the command `imagebert-extract`; the package must be installed: `pip install -e .`)."""

from imagebert_jax.detector.extract_features import main

if __name__ == "__main__":
  main()
