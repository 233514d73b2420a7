"""Transaction contract, loading, cleaning and the monthly features shared by batch and stream."""
