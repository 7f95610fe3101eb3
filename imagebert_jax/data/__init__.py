"""Data: region-feature files, tokenizer, dataset records and builders, tf.data pipelines."""
