"""Helpers for the test suite (multi-process runners and the like); never imported by training."""
