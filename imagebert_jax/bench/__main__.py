"""`python -m imagebert_jax.bench`: the model's steps (imagebert_jax/bench/model.py)."""

from imagebert_jax import allocator

if __name__ == "__main__":
  allocator.reexec("imagebert_jax.bench")  # before JAX and the model are imported, not after
  from imagebert_jax.bench import model
  model.command()
