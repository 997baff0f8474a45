"""bench: load generator and benchmark report for a batchserve deployment."""
