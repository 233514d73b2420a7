"""What every backend shares: the store interface and the per-partition states over it."""
