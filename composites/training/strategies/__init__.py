"""Lightning strategies fitted to composites: DDP set-up for routed models, FSDP2 sharding one unit per sub-model."""
