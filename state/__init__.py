"""Per-customer state records and the DuckDB snapshot analysts query."""
