"""Training inputs: where (source, instruction[, mask, exemplars, metadata]) come from."""
