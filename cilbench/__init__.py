"""cilbench: continual-learning benchmarks for pre-trained vision and vision-language models."""

__version__ = "0.1.0"
