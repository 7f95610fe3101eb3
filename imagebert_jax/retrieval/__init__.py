"""Retrieval: evaluation (all pairs and two stages), binding tests, the Python API of a trained
model, and the search command with its HTML report."""
