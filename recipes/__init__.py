"""Training: one engine, YAML recipes per model family, data pipelines."""
