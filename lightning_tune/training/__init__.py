"""What recipes train with: the losses, optimisers and schedules, callbacks, FSDP2 sharding and the
memory estimate."""
