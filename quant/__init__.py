"""Quantization recipes, QAT/PTQ, the deployment bundle and the integer golden model."""
