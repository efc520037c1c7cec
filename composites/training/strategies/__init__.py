"""Lightning strategies fitted to composites: DDP set-up for routed models, FSDP2 sharding one unit per
sub-model, pipeline stages of a Sequential (behaviour written once; concrete classes per package)."""
