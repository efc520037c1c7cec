"""Lightning strategies fitted to composites: DDP set-up for routed models, FSDP2 sharding one unit per
sub-model, expert parallelism (a Conditional's experts spread over ranks), pipeline stages of a Sequential
(behaviour written once; concrete classes per package)."""
