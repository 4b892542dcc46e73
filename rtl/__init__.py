"""Amaranth hardware generators; they take numbers (or a bundle), never torch."""
