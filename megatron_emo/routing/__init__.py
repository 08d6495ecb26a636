"""EMO routing: document segments, layout-invariant pools, pooled top-k, and router losses."""
