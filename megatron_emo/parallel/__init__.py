"""Parallel layouts: expert-parallel dispatch and combine, expert padding."""
