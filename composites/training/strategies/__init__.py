"""Lightning strategies for composites that spread parts of the model over ranks (expert parallelism)."""
