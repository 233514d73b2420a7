"""The analysts' side: the DuckDB snapshot of the newest scores (`tables`), its readers
(`queries`), the analysts' HTTP API (`api`, `upload`) and the dashboard."""
