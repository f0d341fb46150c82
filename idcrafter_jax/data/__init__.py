"""Data: Grain pipelines, TFDS builder for subject-video records, synthetic data."""
