"""Training checkpoints: complete-or-invisible folders (store), what they hold (state), and
each rank's tensors as pieces of one-process tensors (sharded_state), so any layout loads them."""
