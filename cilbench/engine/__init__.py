"""The common loop: trainer, evaluator, runner."""
