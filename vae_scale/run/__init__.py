"""A training run's lifecycle: the loop, the session owning preemption, goodput and checkpoints,
checkpoint I/O and resume planning."""
