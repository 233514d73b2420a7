"""The customer state a worker keeps: a store per backend behind one interface (`base/store`),
the per-partition states and their changelog transaction (`base/partition`), the record codec
(`record`) and recovery from the changelog (`recovery`)."""
