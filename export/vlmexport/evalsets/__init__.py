"""Evaluation sets made apart from the training data."""
