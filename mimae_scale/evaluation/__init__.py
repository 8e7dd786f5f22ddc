"""Evaluation and interoperability: export to timm / MAE, kNN and linear probes, reconstruction pictures."""
