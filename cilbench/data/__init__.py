"""Data: catalog -> prepared store -> scenario."""
