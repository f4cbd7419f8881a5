"""Run records, paper references, tables and regression checks."""
