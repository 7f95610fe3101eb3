"""Masking and the losses of pretraining and retrieval fine-tuning. Imports without TensorFlow."""
