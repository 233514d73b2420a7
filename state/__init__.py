"""Customer state, live and snapshotted: what the worker keeps (`state.live`) and the DuckDB
snapshot analysts read (`state.snapshot`); `state.auth` guards both over HTTP."""
