"""Paillier secure aggregation."""
