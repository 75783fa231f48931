"""Checks and diagnostics of a fitted guide."""
