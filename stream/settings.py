"""One settings object for every command: defaults, overridden by CLV_* environment variables,
overridden by command-line flags. Each setting is declared once, typed, with its bounds, default
and meaning (pydantic): the environment, the flags of `clv` (their help and their checks), `clv
config` and the operations guide's table are all read from here. `clv config` prints the resolved
values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Level = Literal["debug", "info", "warning", "error"]


class SettingsError(ValueError):
    """A setting with a value it cannot take; the CLI prints it as one line, exit 2."""


def _setting(default: Any, doc: str, env: str | None = None, **bounds: Any) -> Any:
    return Field(default, description=doc, json_schema_extra={"env": env} if env else None, **bounds)


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    bootstrap_servers: str = _setting(
        "127.0.0.1:9092", "Kafka bootstrap servers, comma-separated", "KAFKA_BOOTSTRAP_SERVERS", min_length=1
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = _setting(
        "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = _setting(
        "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
    )
    sasl_username: str = _setting("", "SASL user name")
    sasl_password: str = _setting("", "SASL password")
    ssl_cafile: str = _setting("", "CA bundle for SSL")
    app_id: str = _setting("clv-worker", "consumer group and table-changelog prefix of the worker", min_length=1)
    transactions_topic: str = _setting("transactions", "input topic", min_length=1)
    scores_topic: str = _setting("clv-scores", "output topic (compacted)", min_length=1)
    dlq_topic: str = _setting("transactions-dlq", "dead-letter topic", min_length=1)
    control_topic: str = _setting("clv-control", "operator commands to the workers (clv rescore-all)", min_length=1)
    partitions: int = _setting(4, "partitions of the transactions topic (and of the state changelog)", gt=0)
    replication_factor: int = _setting(1, "replicas of every topic the product creates (production: 3)", gt=0)
    min_insync_replicas: int = _setting(
        1,
        "min.insync.replicas of every topic the product creates; with acks=all a write needs that "
        "many replicas (production: 2)",
        gt=0,
    )
    max_future_minutes: float = _setting(
        15.0,
        "how far an event time may be ahead of the worker's wall clock; later events go to the DLQ as from_future",
        ge=0,
        allow_inf_nan=False,
    )
    model_dir: str = _setting("", "model artifact directory; empty: the model shipped with the package")
    store: str = _setting("memory://", "state store: memory:// or rocksdb:// (rocksdict, in data_dir)")
    data_dir: str = _setting("var/worker", "worker state directory", min_length=1)
    batch_size: int = _setting(1024, "rescoring micro-batch: flush at N customers", gt=0)
    batch_wait_ms: int = _setting(20, "rescoring micro-batch: flush after T ms", gt=0)
    publish_timeout_s: float = _setting(
        30.0,
        "longest the worker waits for the broker to acknowledge a micro-batch's scores and state "
        "records before that flush counts as failed and is retried",
        gt=0,
        allow_inf_nan=False,
    )
    flush_failure_timeout_s: float = _setting(
        120.0,
        "how long flushes may keep failing (retried with backoff, /ready answering 503) before "
        "the worker exits with code 75 for its supervisor to restart it",
        gt=0,
        allow_inf_nan=False,
    )
    fetch_wait_ms: int = _setting(
        50,
        "longest a consumer fetch waits for new data (brokers that hold a fetch for its whole "
        "wait, like the embedded one, add it to every event's latency)",
        gt=0,
    )
    commit_interval_s: float = _setting(
        0.5,
        "how often the worker commits the offsets of the events it has acknowledged (faust's "
        "default is 2.8 s): a restart redelivers at most this much more than it must, and the "
        "consumer lag gauge (of committed offsets) reaches 0 this soon after the worker catches up",
        gt=0,
        allow_inf_nan=False,
    )
    commit_stall_s: float = _setting(
        30.0,
        "how long a partition's committed offset may stay put while events after it are "
        "processed before /ready answers 503 naming the partition (an event never acknowledged)",
        gt=0,
        allow_inf_nan=False,
    )
    session_timeout_s: float = _setting(
        30.0, "consumer group session timeout: how soon a dead worker's partitions move", gt=0, allow_inf_nan=False
    )
    web_port: int = _setting(6066, "worker HTTP port (/health, /metrics, ...)", gt=0, lt=65536)
    web_host: str = _setting(
        "127.0.0.1", "worker HTTP bind address; on any other than loopback its endpoints need api_token"
    )
    snapshot_path: str = _setting(
        "var/clv.duckdb", "DuckDB snapshot the sink publishes and analysts read", min_length=1
    )
    snapshot_interval_s: float = _setting(
        10.0, "seconds between snapshots (one more is written on shutdown)", gt=0, allow_inf_nan=False
    )
    snapshot_memory_mb: int = _setting(
        256, "memory the snapshot sink's DuckDB may use; beyond it, it works from its file on disk", gt=0
    )
    snapshot_drivers_top: int = _setting(
        200,
        "customers of the highest clv whose drivers each snapshot carries (the sink reads the "
        "state changelog and explains their scores with the model in model_dir); 0: none",
        ge=0,
    )
    snapshot_distributions: bool = _setting(
        True,
        "each snapshot carries every customer's predictive distribution of spend, what P(spend >= T) "
        "is computed from (the sink reads the state changelog and runs the model in model_dir)",
    )
    api_host: str = _setting("127.0.0.1", "analyst API bind address")
    api_port: int = _setting(8080, "analyst API port", gt=0, lt=65536)
    api_token: str = _setting(
        "",
        "bearer token the analyst API requires; required when api_host is not loopback, and for "
        "the worker's endpoints when web_host is not loopback",
    )
    api_sql_timeout_s: float = _setting(
        10.0, "longest an API /sql query runs; then it is stopped and answered 408", gt=0, allow_inf_nan=False
    )
    api_sql_max_rows: int = _setting(
        10_000, "most rows an API /sql answer carries (it says truncated when there were more)", gt=0
    )
    api_sql_concurrency: int = _setting(
        2, "API /sql queries running at once, each on its own thread; one more is answered 503", gt=0
    )
    api_rate_limit_per_min: int = _setting(
        300, "API requests a client (its token, else its address) may make a minute before 429; 0: no limit", ge=0
    )
    api_score_max_bytes: int = _setting(
        50 * 2**20, "largest transaction file API POST /score takes (multipart framing aside); larger is 413", gt=0
    )
    api_audit_log: str = _setting("-", "file the API appends a JSON line per request to; -: stderr")
    log_level: Level = _setting("info", "debug, info, warning or error")

    @field_validator("store")
    @classmethod
    def _known_store(cls, store: str) -> str:
        if store.split("://")[0] not in ("memory", "rocksdb"):
            raise ValueError(f"store must be memory:// or rocksdb://, got {store!r}")
        return store

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case(cls, level: Any) -> Any:
        return level.lower() if isinstance(level, str) else level

    @model_validator(mode="after")
    def _writes_can_succeed(self) -> Settings:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"min_insync_replicas ({self.min_insync_replicas}) cannot exceed "
                f"replication_factor ({self.replication_factor}): no write would succeed"
            )
        return self

    @property
    def changelog_topic(self) -> str:
        """The state changelog: the name of the faust table it replaced, so older changelogs
        recover into the store."""
        return f"{self.app_id}-customer-state-changelog"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults < CLV_<NAME> (or the documented alias) < explicit overrides (CLI flags, None:
        not given); `environ` in place of the process's environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            found = [environ[v] for v in env_names(name) if environ.get(v)]
            if found:
                values[name] = found[0]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise SettingsError(one_line(exc)) from None

    def topic_configs(self) -> dict[str, str]:
        """Broker configs every topic the product creates carries, beside its own."""
        return {"min.insync.replicas": str(self.min_insync_replicas)}

    def kafka_client_options(self) -> dict[str, Any]:
        """Security options in aiokafka's names, passed through unchanged."""
        opts: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            opts.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol.endswith("SSL"):
            import ssl

            opts["ssl_context"] = ssl.create_default_context(cafile=self.ssl_cafile or None)
        return opts

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(setting, environment variable, default, meaning) rows for docs and `clv config`."""
        return [
            (name, " or ".join(env_names(name)), repr(f.default), f.description or "")
            for name, f in cls.model_fields.items()
        ]


def env_names(name: str) -> list[str]:
    """The environment variables of a setting, the first set wins: CLV_<NAME>, then its alias."""
    extra = Settings.model_fields[name].json_schema_extra
    alias = extra.get("env") if isinstance(extra, dict) else None
    return [f"CLV_{name.upper()}"] + ([str(alias)] if alias else [])


def one_line(exc: ValidationError) -> str:
    """A validation failure as `clv: error:` prints it: what, and the value given."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "value_error":
            parts.append(str(err["ctx"]["error"]))
        else:
            parts.append(f"{where}: {err['msg'].lower()}, got {err['input']!r}".lstrip(": "))
    return "; ".join(parts)
