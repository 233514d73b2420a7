"""One settings object for every command: defaults, overridden by CLV_* environment variables,
overridden by command-line flags. `clv config` prints the resolved values."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any


class SettingsError(ValueError):
    """A setting with a value it cannot take; the CLI prints it as one line, exit 2."""


def _meta(doc: str, env: str | None = None) -> dict[str, Any]:
    return {"doc": doc, "env": env}


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata=_meta(
        "Kafka bootstrap servers, comma-separated", "KAFKA_BOOTSTRAP_SERVERS"))
    security_protocol: str = field(default="PLAINTEXT", metadata=_meta(
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"))
    sasl_mechanism: str = field(default="", metadata=_meta("PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"))
    sasl_username: str = field(default="", metadata=_meta("SASL user name"))
    sasl_password: str = field(default="", metadata=_meta("SASL password"))
    ssl_cafile: str = field(default="", metadata=_meta("CA bundle for SSL"))
    app_id: str = field(default="clv-worker", metadata=_meta(
        "consumer group and table-changelog prefix of the worker"))
    transactions_topic: str = field(default="transactions", metadata=_meta("input topic"))
    scores_topic: str = field(default="clv-scores", metadata=_meta("output topic (compacted)"))
    dlq_topic: str = field(default="transactions-dlq", metadata=_meta("dead-letter topic"))
    control_topic: str = field(default="clv-control", metadata=_meta(
        "operator commands to the workers (clv rescore-all)"))
    partitions: int = field(default=4, metadata=_meta(
        "partitions of the transactions topic (and of the state changelog)"))
    replication_factor: int = field(default=1, metadata=_meta(
        "replicas of every topic the product creates (production: 3)"))
    min_insync_replicas: int = field(default=1, metadata=_meta(
        "min.insync.replicas of every topic the product creates; with acks=all a write needs that "
        "many replicas (production: 2)"))
    max_future_minutes: float = field(default=15.0, metadata=_meta(
        "how far an event time may be ahead of the worker's wall clock; later events go to the "
        "DLQ as from_future"))
    model_dir: str = field(default="", metadata=_meta(
        "model artifact directory; empty: the model shipped with the package"))
    store: str = field(default="memory://", metadata=_meta(
        "state store: memory:// or rocksdb:// (rocksdict, in data_dir)"))
    data_dir: str = field(default="var/worker", metadata=_meta("worker state directory"))
    batch_size: int = field(default=1024, metadata=_meta("rescoring micro-batch: flush at N customers"))
    batch_wait_ms: int = field(default=20, metadata=_meta("rescoring micro-batch: flush after T ms"))
    publish_timeout_s: float = field(default=30.0, metadata=_meta(
        "longest the worker waits for the broker to acknowledge a micro-batch's scores and state "
        "records before that flush counts as failed and is retried"))
    flush_failure_timeout_s: float = field(default=120.0, metadata=_meta(
        "how long flushes may keep failing (retried with backoff, /ready answering 503) before "
        "the worker exits with code 75 for its supervisor to restart it"))
    fetch_wait_ms: int = field(default=50, metadata=_meta(
        "longest a consumer fetch waits for new data (brokers that hold a fetch for its whole "
        "wait, like the embedded one, add it to every event's latency)"))
    commit_interval_s: float = field(default=0.5, metadata=_meta(
        "how often the worker commits the offsets of the events it has acknowledged (faust's "
        "default is 2.8 s): a restart redelivers at most this much more than it must, and the "
        "consumer lag gauge (of committed offsets) reaches 0 this soon after the worker catches up"))
    commit_stall_s: float = field(default=30.0, metadata=_meta(
        "how long a partition's committed offset may stay put while events after it are "
        "processed before /ready answers 503 naming the partition (an event never acknowledged)"))
    session_timeout_s: float = field(default=30.0, metadata=_meta(
        "consumer group session timeout: how soon a dead worker's partitions move"))
    web_port: int = field(default=6066, metadata=_meta("worker HTTP port (/health, /metrics, ...)"))
    web_host: str = field(default="127.0.0.1", metadata=_meta(
        "worker HTTP bind address; on any other than loopback its endpoints need api_token"))
    snapshot_path: str = field(default="var/clv.duckdb", metadata=_meta(
        "DuckDB snapshot the sink publishes and analysts read"))
    snapshot_interval_s: float = field(default=10.0, metadata=_meta(
        "seconds between snapshots (one more is written on shutdown)"))
    snapshot_memory_mb: int = field(default=256, metadata=_meta(
        "memory the snapshot sink's DuckDB may use; beyond it, it works from its file on disk"))
    snapshot_drivers_top: int = field(default=200, metadata=_meta(
        "customers of the highest clv whose drivers each snapshot carries (the sink reads the "
        "state changelog and explains their scores with the model in model_dir); 0: none"))
    api_host: str = field(default="127.0.0.1", metadata=_meta("analyst API bind address"))
    api_port: int = field(default=8080, metadata=_meta("analyst API port"))
    api_token: str = field(default="", metadata=_meta(
        "bearer token the analyst API requires; required when api_host is not loopback, and for "
        "the worker's endpoints when web_host is not loopback"))
    api_sql_timeout_s: float = field(default=10.0, metadata=_meta(
        "longest an API /sql query runs; then it is stopped and answered 408"))
    api_sql_max_rows: int = field(default=10_000, metadata=_meta(
        "most rows an API /sql answer carries (it says truncated when there were more)"))
    api_sql_concurrency: int = field(default=2, metadata=_meta(
        "API /sql queries running at once, each on its own thread; one more is answered 503"))
    api_rate_limit_per_min: int = field(default=300, metadata=_meta(
        "API requests a client (its token, else its address) may make a minute before 429; 0: no limit"))
    api_score_max_bytes: int = field(default=50 * 2**20, metadata=_meta(
        "largest transaction file API POST /score takes (multipart framing aside); larger is 413"))
    api_audit_log: str = field(default="-", metadata=_meta(
        "file the API appends a JSON line per request to; -: stderr"))
    log_level: str = field(default="info", metadata=_meta("debug, info, warning or error"))

    @property
    def changelog_topic(self) -> str:
        """The state changelog: the name of the faust table it replaced, so older changelogs
        recover into the store."""
        return f"{self.app_id}-customer-state-changelog"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults < CLV_<NAME> (or the documented alias) < explicit overrides (CLI flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            names = [f"CLV_{f.name.upper()}"] + ([f.metadata["env"]] if f.metadata.get("env") else [])
            for name in names:
                if name in environ and environ[name] != "":
                    values[f.name] = _coerce(f.name, f.type, environ[name])
                    break
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = replace(cls(), **values)
        settings.check()
        return settings

    def environ(self) -> dict[str, str]:
        """Every setting as its CLV_<NAME> variable: what `from_env` reads back to these settings
        (how `clv worker` hands its flags to the app module, `stream.app`)."""
        return {f"CLV_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}

    def check(self) -> None:
        for name in ("partitions", "replication_factor", "min_insync_replicas", "batch_size",
                     "batch_wait_ms", "publish_timeout_s", "flush_failure_timeout_s",
                     "snapshot_interval_s", "snapshot_memory_mb", "fetch_wait_ms", "commit_interval_s",
                     "commit_stall_s",
                     "api_sql_timeout_s", "api_sql_max_rows", "api_sql_concurrency",
                     "api_score_max_bytes"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_insync_replicas > self.replication_factor:
            raise SettingsError(f"min_insync_replicas ({self.min_insync_replicas}) cannot exceed "
                                f"replication_factor ({self.replication_factor}): no write would succeed")
        if self.max_future_minutes < 0:
            raise SettingsError(f"max_future_minutes must be 0 or positive, got {self.max_future_minutes}")
        if self.snapshot_drivers_top < 0:
            raise SettingsError(f"snapshot_drivers_top must be 0 (none) or positive, got {self.snapshot_drivers_top}")
        if self.api_rate_limit_per_min < 0:
            raise SettingsError(f"api_rate_limit_per_min must be 0 (no limit) or positive, "
                                f"got {self.api_rate_limit_per_min}")
        if self.store.split("://")[0] not in ("memory", "rocksdb"):
            raise SettingsError(f"store must be memory:// or rocksdb://, got {self.store!r}")

    def topic_configs(self) -> dict[str, str]:
        """Broker configs every topic the product creates carries, beside its own."""
        return {"min.insync.replicas": str(self.min_insync_replicas)}

    def kafka_client_options(self) -> dict[str, Any]:
        """Security options in aiokafka's names, passed through unchanged."""
        opts: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            opts.update(sasl_mechanism=self.sasl_mechanism,
                        sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password)
        if self.security_protocol.endswith("SSL"):
            import ssl

            opts["ssl_context"] = ssl.create_default_context(cafile=self.ssl_cafile or None)
        return opts

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(setting, environment variable, default, meaning) rows for docs and `clv config`."""
        rows = []
        for f in fields(cls):
            env = f"CLV_{f.name.upper()}" + (f" or {f.metadata['env']}" if f.metadata.get("env") else "")
            rows.append((f.name, env, repr(f.default), f.metadata["doc"]))
        return rows


def _coerce(name: str, kind: Any, text: str) -> Any:
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise SettingsError(f"{name} must be a {kind}, got {text!r}") from None
    return text
