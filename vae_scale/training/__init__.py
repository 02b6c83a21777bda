"""What one optimizer step computes: losses, the pure train step (mesh-agnostic), gradient
accumulation, optimizers, metrics, and the one place steps meet shardings (`programs`, `sharding`)."""
