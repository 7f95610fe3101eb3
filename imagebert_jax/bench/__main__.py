"""`python -m imagebert_jax.bench`: the model's steps (imagebert_jax/bench/model.py)."""

from imagebert_jax.bench import model

if __name__ == "__main__":
  model.command()
