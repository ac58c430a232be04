"""Metric math (ADM semantics) independent of the feature network."""
