"""Backbones, heads, adapters and CLIP text classifiers."""
