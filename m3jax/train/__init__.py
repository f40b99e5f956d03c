"""Training: optimiser and schedules, the jitted sharded step, the loop, FLOPs accounting."""
