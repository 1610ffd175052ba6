"""Caches, model loading, nodes and the coordinator."""
