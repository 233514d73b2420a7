"""A store on disk: one RocksDB database per partition, bounded memory, restart reads only the tail."""
