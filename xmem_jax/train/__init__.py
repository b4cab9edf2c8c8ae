"""Training: sharding, optimization, loops."""
