"""The `clv` command line. Each subcommand imports what it needs only when it runs, so serving
commands never import torch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import date
from typing import Annotated, Any, NoReturn, Sequence

from export_onnx import ArtifactError
from features.loaders import FORMATS, LoadError
from state.snapshot.queries import QueryError
from state.auth import TokenRequired
from stream.settings import Settings, SettingsError

SETTING = "setting:"  # the argparse dest prefix of flags that override a setting


class UsageError(Exception):
    """A bad argument: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        raise UsageError(message)


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}: {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _rate(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be from 0 up to 1 (0.1 is 10% a year): {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1: {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _positive_float(text: str) -> float:
    value = _number(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _output(path: str, what: str, directory: bool = False) -> None:
    """A file or directory a command will write (its parent must exist), or a UsageError saying
    what is wrong: checked before any broker, model or file work starts."""
    import os
    import tempfile
    from pathlib import Path

    target = Path(path)
    if target.exists() and target.is_dir() != directory:
        raise UsageError(f"{what} {path!r} is {'not ' if directory else ''}a directory")
    where = target if directory and target.exists() else target.parent  # a file is replaced there
    if not where.is_dir():
        raise UsageError(f"{what} {path!r}: directory {str(target.parent)!r} does not exist")
    try:  # the permission bits do not tell (root ignores them; a read-only mount does not)
        if not os.access(where, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
        tempfile.TemporaryFile(dir=where).close()
    except OSError as exc:
        raise UsageError(f"{what} {path!r}: {str(where)!r} is not writable ({exc.strerror or exc})") from None


def _file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="transaction file: Online Retail (I/II) CSV or .xlsx, CDNOW, or CSV with --map")
    p.add_argument("--format", default="auto", choices=FORMATS, help="file layout (default: detect)")
    p.add_argument(
        "--map",
        default=None,
        metavar="FIELD=COLUMN,...",
        help="column mapping for other CSVs, e.g. customer_id=Cust,ts=Date,quantity=Qty,unit_price=Price",
    )
    p.add_argument(
        "--duplicates", choices=("keep", "drop"), default=None, help="exact duplicate lines: keep (default) or drop"
    )
    p.add_argument(
        "--outlier-quantity",
        type=int,
        default=None,
        help="drop lines with |quantity| above this (default 10000; 0 keeps all)",
    )
    p.add_argument("--timezone", default=None, help="zone of zone-less timestamps (default UTC)")


def file_options(args: argparse.Namespace) -> dict[str, Any]:
    """The loader/cleaning keyword arguments a file subcommand was given."""
    from features.loaders import parse_mapping

    return {
        "fmt": args.format,
        "mapping": parse_mapping(args.map) if args.map else None,
        "duplicates": args.duplicates,
        "outlier_quantity": args.outlier_quantity,
        "timezone": args.timezone,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from features.batch import read_lines
    from features.profile import profile, render

    lines, report = read_lines(args.file, **file_options(args))
    p = profile(lines, report)
    print(json.dumps(p, indent=2) if args.json else render(p))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from features import synthetic

    if args.start >= args.end:
        raise UsageError(f"--start {args.start} must be before --end {args.end}")
    _output(args.out, "--out")
    frame, truth = synthetic.generate(
        args.customers,
        args.invoices,
        args.seed,
        args.start.isoformat(),
        args.end.isoformat(),
        args.layout,
        args.wholesale_share,
    )
    synthetic.write(frame, args.out)
    print(
        f"wrote {args.out}: {truth.rows:,} lines, {truth.customers:,} customers "
        f"({args.layout} layout, {args.start} to {args.end}, seed {args.seed}); rows cleaning "
        f"drops: {truth.no_customer:,} without a customer, {truth.zero_price:,} at price 0, "
        f"{truth.duplicate_lines:,} exact duplicates"
    )
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cutoff", type=_date, required=True, help="last day of training data (YYYY-MM-DD)")
    p.add_argument("--horizon-months", type=_positive_int, default=6, help="prediction horizon (default 6)")
    p.add_argument("--window", type=_positive_int, default=13, help="months of history the GRU reads (default 13)")
    p.add_argument("--epochs", type=_positive_int, default=40, help="maximum training epochs (default 40)")
    p.add_argument("--seed", type=int, default=42, help="training seed (default 42)")
    p.add_argument(
        "--ensemble",
        type=_positive_int,
        default=3,
        help="GRUs averaged in the artifact, member k from seed + 1000 k (default 3)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking store that records the run: file:DIR, sqlite:///FILE or a "
        "server's http://HOST:PORT (default sqlite:///var/mlruns/mlflow.db)",
    )


def _train_config(args: argparse.Namespace):
    from models.training import TrainConfig

    return TrainConfig(epochs=args.epochs, seed=args.seed, ensemble=args.ensemble)


def _run_params(args: argparse.Namespace) -> dict[str, Any]:
    """A training or evaluation run's parameters as its command line gave them."""
    names = (
        "file",
        "cutoff",
        "horizon_months",
        "window",
        "epochs",
        "seed",
        "ensemble",
        "discount_rate",
        "seeds",
        "format",
        "map",
        "duplicates",
        "outlier_quantity",
        "timezone",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from export_onnx.export import describe_population, recluster, train
    from features.population import describe
    from models import tracking
    from models.clusters import render
    from models.dataset import NotEnoughHistory

    _output(args.out, "--out", directory=True)
    if args.clusters_only and args.population_only:
        raise UsageError("--clusters-only and --population-only refit different parts: give one")
    try:
        if args.population_only:
            meta = describe_population(args.file, args.cutoff, Path(args.out), **file_options(args))
            print(
                f"training population described: {describe(meta['population'])}; segment shares "
                "of the training cohort: " + ", ".join(f"{k} {v:.1%}" for k, v in meta["segment_shares"].items())
            )
            print(f"model {meta['version']} written to {args.out} (network unchanged)")
            return 0
        if args.clusters_only:
            meta = recluster(args.file, args.cutoff, Path(args.out), args.seed, **file_options(args))
            print(render(meta["clustering"]))
            print(f"clusters refitted: model {meta['version']} written to {args.out}")
            return 0
        with tracking.run("train", args.tracking_uri, f"train {Path(args.file).name} to {args.cutoff}") as rec:
            rec.params(_run_params(args))
            meta = train(
                args.file,
                args.cutoff,
                args.horizon_months,
                args.window,
                Path(args.out),
                _train_config(args),
                args.discount_rate,
                rec.reference(),
                **file_options(args),
            )
            rec.params({"training_data_sha256": meta["training_data_sha256"], "model_version": meta["version"]})
            rec.metrics(tracking.training_metrics(meta))
            rec.files(Path(args.out), "model")
    except (NotEnoughHistory, tracking.TrackingError) as exc:
        raise UsageError(str(exc)) from None
    print(render(meta["clustering"]))
    parity = ", ".join(f"{name} {d['max_rel_diff']:.1e}" for name, d in meta["parity"].items())
    print(
        f"model {meta['version']} written to {args.out} (ONNX vs torch, max relative diff: {parity}); "
        f"run {meta['run']['run_id']} in {meta['run']['tracking_uri']}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import tempfile

    from export_onnx.export import predict_exported
    from models import tracking
    from models.dataset import NotEnoughHistory
    from models.evaluate import evaluate, render, summary, write_json, write_plots

    if args.json:
        _output(args.json, "--json")
    try:
        with (
            tracking.run("evaluate", args.tracking_uri, f"evaluate {Path(args.file).name} at {args.cutoff}") as rec,
            tempfile.TemporaryDirectory() as tmp,
        ):
            rec.params(_run_params(args))
            run = evaluate(
                args.file,
                args.cutoff,
                args.horizon_months,
                args.window,
                predict_exported,
                _train_config(args),
                seeds=args.seeds,
                **file_options(args),
            )
            rec.params({"training_data_sha256": run.data_sha256, "customers": run.customers})
            tracking.record_evaluation(rec, run, summary(run))
            write_json(run, Path(tmp) / "evaluation.json")
            rec.files(Path(tmp) / "evaluation.json")
            if args.json:
                write_json(run, Path(args.json))
            plots = write_plots(run, Path(args.plots or tmp))
            for path in plots:
                rec.files(path, "plots")
    except (NotEnoughHistory, tracking.TrackingError) as exc:
        raise UsageError(str(exc)) from None
    print(render(run))
    if args.plots:
        for path in plots:
            print(f"wrote {path}")
    print(f"run {rec.run_id} in {rec.tracking_uri}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from export_onnx.explain import Explainer
    from export_onnx.runtime import Artifact
    from export_onnx.scoring import score_file, write_csv

    if not args.out and not args.explain:
        raise UsageError("score needs --out FILE, --explain ID, or both")
    if args.out:
        _output(args.out, "--out")
    artifact = Artifact.load(args.model)
    explainer = Explainer(artifact) if args.explain else None  # refuses a model it cannot explain
    scored = score_file(artifact, args.file, args.as_of, args.at_least, **file_options(args))
    if args.out:
        with open(args.out, "w", newline="") as fh:
            write_csv(scored.scores, fh, scored.at_least)
        print(
            f"scored {len(scored.scores):,} customers as of {scored.as_of.isoformat()} with "
            f"{artifact.version} -> {args.out}"
        )
    if scored.drift is None:
        print(
            f"note: model {artifact.version} records no training population, so these customers "
            "are not compared with it (clv train --population-only adds it)",
            file=sys.stderr,
        )
    elif warning := scored.drift.sentence():
        print(f"warning: {warning}", file=sys.stderr)
    if explainer is not None:
        _print_drivers(explainer, scored, args.explain, args.file)
    return 0


def _print_drivers(explainer: Any, scored: Any, ids: list[str], file: str) -> None:
    """Each asked customer's score and the drivers that add up to it."""
    from export_onnx.explain import render

    where = {s.customer_id: i for i, s in enumerate(scored.scores)}
    missing = [cid for cid in ids if cid not in where]
    if missing:
        raise UsageError(f"--explain: no customer {', '.join(map(repr, missing))} in {file}")
    chosen = [where[cid] for cid in ids]
    drivers = explainer.drivers([scored.states[i] for i in chosen], scored.as_of)
    for i, d in zip(chosen, drivers):
        s = scored.scores[i]
        print(
            f"customer {s.customer_id}: expected spend ${s.clv:,.2f} over the {s.horizon_months} "
            f"months after {s.as_of[:10]} (P(purchase) {s.p_purchase:.0%}; model {s.model_version})"
        )
        print(render(d))


def cmd_score_schema(args: argparse.Namespace) -> int:
    from features.scores import score_schema_json

    sys.stdout.write(score_schema_json())
    return 0


def _setting_arg(p: argparse.ArgumentParser, name: str, *flags: str) -> None:
    """A flag that overrides setting `name`: its type, bounds, default and meaning are the
    setting's own (`stream.settings`), so the help and the checks cannot drift from them."""
    from pydantic import TypeAdapter, ValidationError

    field = Settings.model_fields[name]
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(kind)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError:
            raise argparse.ArgumentTypeError(f"must be {_kind(field)}: {text!r}") from None

    default = f" (default {field.default})" if field.default != "" else ""
    p.add_argument(
        *flags,
        dest=SETTING + name,
        type=parse,
        default=None,
        metavar=flags[-1].lstrip("-").upper().replace("-", "_"),
        help=f"{field.description}{default}",
    )


def _kind(field: Any) -> str:
    """What a setting's values are, in words, from its type and bounds."""
    import typing

    if typing.get_origin(field.annotation) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(field.annotation))
    gt, ge, lt = (next((getattr(m, b) for m in field.metadata if hasattr(m, b)), None) for b in ("gt", "ge", "lt"))
    noun = {int: "whole number", float: "number"}.get(field.annotation, "text")
    if lt is not None:
        return f"a {noun} from {(gt or 0) + 1} to {lt - 1}"
    if gt == 0:
        return f"a positive {noun}"
    if ge == 0:
        return f"a {noun}, 0 or more"
    return "not empty" if noun == "text" else f"a {noun}"


def _settings(args: argparse.Namespace) -> Settings:
    """The settings with the flags this command was given over the environment's."""
    return Settings.from_env(**{k[len(SETTING) :]: v for k, v in vars(args).items() if k.startswith(SETTING)})


def _kafka_args(p: argparse.ArgumentParser) -> None:
    _setting_arg(p, "bootstrap_servers", "--bootstrap")
    _setting_arg(p, "partitions", "--partitions")


def cmd_broker(args: argparse.Namespace) -> int:
    import signal

    from stream.broker import BrokerError, start

    try:
        proc = start(args.port)
    except BrokerError as exc:
        raise UsageError(str(exc)) from None
    print(f"embedded Kafka-protocol broker (Tansu, in memory) on 127.0.0.1:{args.port}; Ctrl-C stops it", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(10)
        return 0


def _reachable(settings: Settings) -> None:
    """Create the product's topics (partitions, replication, min.insync.replicas from the
    settings), or a UsageError when the broker does not answer or `transactions` has another
    partition count than the settings (the state, the scores and routing follow it)."""
    import asyncio

    from aiokafka.errors import KafkaError

    from stream.replay import all_topics, ensure_topics

    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)  # the error below says it in one line
    try:
        partitions = asyncio.run(ensure_topics(settings, all_topics(settings)))
    except (KafkaError, OSError) as exc:
        raise UsageError(f"cannot create the topics on Kafka at {settings.bootstrap_servers}: {exc}") from None
    finally:
        client_log.setLevel(level)
    have = partitions.get(settings.transactions_topic)
    if have != settings.partitions:
        raise UsageError(
            f"topic {settings.transactions_topic} has {have} partitions but "
            f"partitions is {settings.partitions}: set CLV_PARTITIONS={have}"
        )


def cmd_worker(args: argparse.Namespace) -> int:
    from faust import Worker

    settings = _settings(args)
    _output(settings.data_dir, "--data-dir", directory=True)
    from stream.app import create_app

    app = create_app(settings)  # loads the model: a broken one is one line, before the broker

    _reachable(settings)

    worker = Worker(app, loglevel=settings.log_level.upper(), quiet=True)
    worker.execute_from_commandline()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    import asyncio

    from features.batch import read_history
    from stream.replay import publish

    history = read_history(args.file, **file_options(args))
    summary = asyncio.run(
        publish(_settings(args), history.events, len(history.events), args.rate, progress=not args.quiet)
    )
    print(summary.render())
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from stream.bootstrap import BootstrapError, bootstrap

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its errors come back as ours
    try:
        summary = bootstrap(args.file, file_options(args), _settings(args), force=args.force, progress=not args.quiet)
    except BootstrapError as exc:
        raise UsageError(str(exc)) from None
    print(summary.render())
    if summary.drift:
        print(f"warning: {summary.drift}", file=sys.stderr)
    return 0


def _snapshot_args(p: argparse.ArgumentParser) -> None:
    _setting_arg(p, "snapshot_path", "--snapshot")


def _snapshot(args: argparse.Namespace):
    from state.snapshot.queries import Snapshot

    return Snapshot(_settings(args).snapshot_path)


def _selection_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--segment", action="append", default=None, help=f"{what}: only this segment or value tier (repeat for several)"
    )
    p.add_argument(
        "--cluster", action="append", default=None, help=f"{what}: only this behavioral cluster (repeat for several)"
    )
    p.add_argument(
        "--country",
        action="append",
        default=None,
        help=f"{what}: only customers of this country, where known (repeat for several)",
    )
    p.add_argument(
        "--min-frequency",
        type=_non_negative_int,
        default=0,
        help=f"{what}: only customers with at least this many purchases",
    )
    p.add_argument("--min-clv", type=float, default=None, help=f"{what}: only expected CLV >= this")


def _selection(args: argparse.Namespace):
    from state.snapshot.queries import Selection

    return Selection(
        tuple(args.segment or ()),
        tuple(args.cluster or ()),
        args.min_frequency,
        args.min_clv,
        tuple(args.country or ()),
    )


def cmd_snapshot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stream.sink import run

    settings = _settings(args)
    try:  # the snapshot's directory is created, as the default var/ is
        Path(settings.snapshot_path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--snapshot {settings.snapshot_path!r}: {exc.strerror}") from None
    _output(settings.snapshot_path, "--snapshot")
    return run(settings)


def _print_rows(rows: list[dict[str, Any]], as_json: bool, columns: Sequence[str] | None = None) -> None:
    from state.snapshot.queries import render_table

    print(json.dumps(rows, indent=2) if as_json else render_table(rows, list(columns) if columns else None))


def cmd_query(args: argparse.Namespace) -> int:
    from state.snapshot.queries import TOP_COLUMNS

    snap = _snapshot(args)
    if args.what == "top":
        rows = snap.top(args.n, _selection(args))
        _print_rows(rows, args.json, None if args.json else TOP_COLUMNS)
    elif args.what == "segments" and args.json:
        _print_rows(snap.segments(), True)
    elif args.what == "segments":
        from state.snapshot.queries import render_segments, render_totals

        print(render_segments(snap.segments()))
        print()
        print(render_totals(snap.tiers()))
    elif args.what == "clusters":
        _print_rows(snap.clusters(), args.json)
    elif args.what == "customer":
        row = snap.customer(args.arg)
        if row is None:
            raise UsageError(f"customer {args.arg!r} is not in the snapshot")
        print(json.dumps(row, indent=2))
    elif args.what == "summary":
        print(json.dumps(snap.summary(), indent=2))
    else:
        answer = snap.sql(args.arg)
        _print_rows([dict(zip(answer.columns, r)) for r in answer.rows], args.json, answer.columns)
        if answer.truncated:
            print(f"(the first {len(answer.rows):,} rows only)", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from state.snapshot.queries import export

    _output(args.out, "--out")
    n = export(_snapshot(args), Path(args.out), _selection(args))
    print(f"exported {n:,} customers to {args.out}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from state.snapshot.api import serve

    return serve(_settings(args))


def cmd_dashboard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from state.snapshot import dashboard
    from stream.broker import free_port

    snapshot = Path(_settings(args).snapshot_path)
    try:
        if args.screenshot:
            dashboard.screenshot(snapshot, Path(args.screenshot), args.model, free_port())
            print(f"wrote {args.screenshot}")
            return 0
        return dashboard.serve(snapshot, args.host, args.port, args.model)
    except dashboard.DashboardError as exc:
        raise UsageError(str(exc)) from None


def cmd_rescore_all(args: argparse.Namespace) -> int:
    import asyncio

    from stream.control import rescore_all

    n = asyncio.run(rescore_all(_settings(args)))
    print(
        f"rescore-all sent to the owners of {n} partitions of {_settings(args).control_topic}; "
        "watch clv_backlog_customers on the workers' /metrics"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stream.broker import BrokerError
    from stream.demo import DemoError, DemoOptions, run
    from stream.processes import ChildError

    opts = DemoOptions(
        data=args.file,
        customers=args.customers,
        rate=args.rate,
        model=args.model,
        train=args.train,
        workdir=Path(args.workdir),
        exit_after=args.exit,
        epochs=args.epochs,
    )
    try:
        return run(opts)
    except (DemoError, ChildError, BrokerError) as exc:
        raise UsageError(str(exc)) from None


def cmd_bench(args: argparse.Namespace) -> int:
    from stream import bench

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # figures, not client chatter
    if args.json:
        _output(args.json, "--json")
    workdir = bench.workdir_for(args.workdir)
    bootstrap = getattr(args, "bootstrap", None)  # absent for the benchmarks without a broker
    if args.what == "throughput":
        result = bench.throughput(
            args.invoices,
            args.customers,
            args.partitions,
            args.repeats,
            bootstrap,
            workdir,
            session_timeout_s=args.session_timeout,
        )
        med, lines = result["median_messages_per_s"], result["median_lines_per_s"]
        print(
            f"{args.invoices:,} invoices ({result['lines']:,} lines), {args.customers:,} customers, "
            f"{args.partitions} partitions; median of {args.repeats} runs each"
        )
        for key, name in (
            ("raw", "raw aiokafka (ceiling)"),
            ("bare", "bare faust agent (floor cost)"),
            ("peer", "Quix Streams peer (same fold)"),
            ("full", "full worker path"),
        ):
            if key in med:
                print(f"  {name:<32}{med[key]:>12,.0f} msg/s {lines[key]:>12,.0f} lines/s")
            else:
                print(f"  {name:<32}{result['peer_missing']}")
        print(
            f"  full/bare {result['full_over_bare']:.2f}   full/raw {result['full_over_raw']:.3f}"
            + (f"   full/peer {result['full_over_peer']:.2f}" if "full_over_peer" in result else "")
        )
    elif args.what == "latency":
        max_rate = args.max_rate
        rates = args.rate
        if not rates:
            if max_rate is None:
                print("measuring the worker's maximum rate first (bench throughput, 1 run)...", flush=True)
                max_rate = bench.throughput(
                    args.invoices,
                    args.customers,
                    4,
                    1,
                    bootstrap,
                    workdir,
                    peer=False,
                    session_timeout_s=args.session_timeout,
                )["median_messages_per_s"]["full"]
            rates = [round(max_rate * 0.25), round(max_rate * 0.5)]
        result = bench.latency(rates, max_rate, args.seconds, args.linger_ms, bootstrap, workdir, args.session_timeout)
        print(
            f"event time -> score readable on the scores topic, {args.seconds:.0f}s per rate"
            + (f" (max rate {max_rate:,.0f}/s)" if max_rate else "")
        )
        for rate, r in result["rates"].items():
            print(
                f"  {float(rate):>8,.0f}/s  p50 {r.get('p50_ms')} ms  p95 {r.get('p95_ms')} ms  "
                f"p99 {r.get('p99_ms')} ms  max {r['max_ms']} ms  ({r['scored']:,}/{r['events']:,} scored)"
            )
    elif args.what == "scoring":
        result = bench.scoring(args.batch_sizes, args.seconds, args.model, _torch_twin())
        print(f"{result['model']}: customers/s by batch size (1 thread); torch: {result['torch']}")
        for row in result["rows"]:
            torch_rate = f"{row['torch_per_s']:>12,.0f}" if "torch_per_s" in row else "           -"
            print(f"  batch {row['batch']:>5}  onnxruntime {row['onnxruntime_per_s']:>12,.0f}  torch {torch_rate}")
        print(
            f"  best batched / one at a time: {result['batched_over_single']}x; "
            f"the worker flushes at {result['worker_batch_size']} customers"
        )
        print(
            f"  drivers of a score: {result['drivers']['customers_per_s']:,.0f} customers/s "
            f"({result['drivers']['rows_per_customer']} model rows each)"
        )
    elif args.what == "bootstrap":
        result = bench.bootstrap(args.lines, bootstrap, workdir)
        print(
            f"clv bootstrap of {result['lines']:,} lines ({result['customers']:,} customers): "
            f"{result['seconds']:.1f}s end to end, {result['lines_per_s']:,.0f} lines/s "
            f"({result['cpu_seconds']:.1f} CPU s); "
            f"exact {str(result['exact']).lower()} (largest relative difference from clv score "
            f"{result['max_rel_diff']:.1e})"
        )
    elif args.what == "api":
        from stream import bench_api

        result = bench_api.run(args.customers, args.clients, args.seconds, workdir)
        print(
            f"analyst API alone, {result['customers']:,} customers, {result['clients']} concurrent "
            f"clients from another process, {result['seconds_per_mix']:g}s per mix, rate limit off "
            f"({result['cpus']} CPUs shared by the API and the client)"
        )
        for mix, r in result["mixes"].items():
            print(
                f"  {mix:<24}{r['requests_per_s']:>9,.0f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                f"5xx {r['errors_5xx']}  connection errors {r['connection_errors']}  "
                f"client CPU {r['client_cpu_share']:.0%}"
            )
    elif args.what == "month-turn":
        result = bench.month_turn(args.customers, args.rate, bootstrap, workdir, session_timeout_s=args.session_timeout)
        turn, before = result["events_during_turn"], result["events_before"]
        print(
            f"month turn over {result['customers']:,} bootstrapped customers (4 partitions, one "
            f"worker): {result['rescored_customers']:,} rescored and published in "
            f"{result['turn_seconds']}s ({result['rescored_per_s']:,}/s); ordinary events at "
            f"{args.rate:,.0f}/s meanwhile: p50 {turn.get('p50_ms')} ms, p99 {turn.get('p99_ms')} "
            f"ms, max {turn['max_ms']} ms ({turn['scored']:,}/{turn['events']:,} scored; before "
            f"the turn p99 {before.get('p99_ms')} ms); flush failures "
            f"{result['flush_failures']:.0f}; /ready {result['ready_answers']}"
        )
    elif args.what == "sink":
        from stream.sink import bench as bench_sink

        result = bench_sink(args.customers, workdir, _settings(args))
        print(
            f"snapshot sink, {result['customers']:,} customers: folds {result['fold_messages_per_s']:,} "
            f"score messages/s; snapshot {result['first_snapshot_seconds']:.2f}s, again after a "
            f"tenth rescored {result['snapshot_seconds']:.2f}s ({result['snapshot_mb']} MB file); "
            f"peak RSS {result['peak_rss_mb']:.0f} MB ({result['rss_before_mb']:.0f} MB before "
            f"folding; DuckDB limited to {result['duckdb_memory_limit_mb']} MB)"
        )
    else:
        result = bench.state(args.customers, args.stores, bootstrap, workdir, args.session_timeout)
        print(
            f"{args.customers:,} customers, {result['changelog_records']:,} changelog records "
            f"(history {result['history']}), then {result['live_events']:,} live invoices"
        )
        for store, r in result["stores"].items():
            print(
                f"  {store:<12} {r['mb_per_100k_customers']:>8.1f} MB per 100k customers "
                f"(RSS {r['rss_base_mb']} -> {r['rss_held_mb']} MB); new process, empty "
                f"directory: ready in {r['recovery_seconds']:.1f}s, recovery "
                f"{r['recovery_records_per_s'] or 0:,.0f} records/s; restart on its own "
                f"directory: ready in {r['restart_seconds']:.1f}s ({r['restart_records']:,} "
                f"records replayed)"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def _torch_twin() -> Any:
    """The train extra's torch twin of a model for `clv bench scoring`; None without it."""
    try:
        from models.networks import random_twin
    except ImportError:  # onnxruntime alone
        return None
    return random_twin


def cmd_config(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    for name, env, _default, doc in Settings.describe():
        value = getattr(settings, name)
        shown = "***" if ("password" in name or "token" in name) and value else repr(value)
        print(f"{name:<24}{shown:<28}{env:<50}{doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clv", description="Streaming customer lifetime value.")
    _setting_arg(parser, "log_level", "--log-level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="cleaning report and profile of a transaction file")
    _file_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "generate",
        help="write a synthetic Online Retail-format file: a season, "
        "wholesale customers and the faults of real exports",
    )
    p.add_argument("--out", required=True, help="file to write (.csv, .csv.gz or .xlsx)")
    p.add_argument("--customers", type=_positive_int, default=4300, help="customers (default 4300)")
    p.add_argument(
        "--invoices", type=_positive_int, default=26000, help="invoices before the season thins them (default 26000)"
    )
    p.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")
    p.add_argument("--start", type=_date, default=date(2010, 12, 1), help="first day (default 2010-12-01)")
    p.add_argument("--end", type=_date, default=date(2011, 12, 9), help="last day (default 2011-12-09)")
    p.add_argument(
        "--layout",
        choices=("online-retail", "online-retail-ii"),
        default="online-retail",
        help="column layout of the UCI export to imitate (default online-retail)",
    )
    p.add_argument(
        "--wholesale-share",
        type=_fraction,
        default=0.03,
        help="share of customers ordering 10-60 times the usual quantities (default 0.03)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train the GRU on data up to a cutoff and export the ONNX artifact")
    _file_args(p)
    _model_args(p)
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument(
        "--discount-rate",
        type=_rate,
        default=0.0,
        help="annual discount rate: clv becomes the discounted expected spend, month k "
        "weighted (1 + rate)^(-k/12) (default 0)",
    )
    p.add_argument(
        "--clusters-only",
        action="store_true",
        help="refit only the behavioral clusters of the model in --out, on the data and "
        "cutoff it was trained on (no network training; its version gets the "
        "new clusters' digest)",
    )
    p.add_argument(
        "--population-only",
        action="store_true",
        help="add to the model in --out the description of its training cohort that "
        "scorers compare customers with (input distributions, segment shares), "
        "recomputed from the data and cutoff it was trained on (no training; "
        "network and version unchanged)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="GRU vs FFNN, naive, BG/NBD + Gamma-Gamma, GBT and random forest on a holdout")
    _file_args(p)
    _model_args(p)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="train and report every seeded model once per seed, with mean +- sd (default: --seed alone)",
    )
    p.add_argument(
        "--json",
        default=None,
        help="write the metrics as JSON here (one seed: "
        '{"customers", "models"}; several: that per seed under "seeds", and "summary")',
    )
    p.add_argument("--plots", default=None, help="write gains and decile PNGs into this directory")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="batch-score every customer of a file with an ONNX model")
    _file_args(p)
    p.add_argument("--model", default=None, help="artifact directory (default: the shipped model)")
    p.add_argument("--as-of", type=_date, default=None, help="score as of the end of this day (default: newest event)")
    p.add_argument("--out", default=None, help="CSV to write")
    p.add_argument(
        "--explain",
        action="append",
        default=[],
        metavar="ID",
        help="print this customer's drivers: dollars per group of inputs (recency, "
        "frequency, order value, trend, tenure) that add up to its score from the "
        "model's average customer; repeat for more customers",
    )
    p.add_argument(
        "--at-least",
        type=float,
        nargs="+",
        default=(),
        metavar="DOLLARS",
        help="add a column p_at_least_T per threshold T: each customer's probability "
        "of spending at least T over the horizon, from the model's predictive "
        "distribution",
    )
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("score-schema", help="print the JSON Schema of a clv-scores message")
    p.set_defaults(func=cmd_score_schema)

    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (loopback, in memory)")
    p.add_argument("--port", type=_positive_int, default=9092, help="port (default 9092)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("worker", help="run the streaming CLV worker (faust)")
    _kafka_args(p)
    for name, flag in (
        ("model_dir", "--model"),
        ("store", "--store"),
        ("web_port", "--web-port"),
        ("batch_size", "--batch-size"),
        ("batch_wait_ms", "--batch-wait-ms"),
        ("data_dir", "--data-dir"),
        ("publish_timeout_s", "--publish-timeout-s"),
        ("flush_failure_timeout_s", "--flush-failure-timeout-s"),
    ):
        _setting_arg(p, name, flag)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("replay", help="publish a transaction file as invoice events, in time order")
    _file_args(p)
    _kafka_args(p)
    p.add_argument(
        "--rate", type=_positive_float, default=None, help="events per second (default: as fast as possible)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "bootstrap",
        help="every customer's state and first score from a history "
        "file, written to the state changelog and clv-scores (instead of a replay)",
    )
    _file_args(p)
    _kafka_args(p)
    _setting_arg(p, "model_dir", "--model")
    p.add_argument(
        "--force",
        action="store_true",
        help="write even if the state changelog or clv-scores is not empty (to finish a bootstrap whose write failed)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("demo", help="the whole product on an embedded broker, with CDNOW replayed")
    p.add_argument("file", nargs="?", default=None, help="transaction file (default: vendored CDNOW)")
    p.add_argument("--customers", type=_positive_int, default=None, help="replay only the first N customers")
    p.add_argument("--rate", type=_positive_float, default=1500.0, help="invoices per second (default 1500)")
    p.add_argument("--model", default=None, help="model artifact directory (default: the shipped model)")
    p.add_argument(
        "--train",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train a model on the file first (needs the train extra); default: when the "
        "model was not trained on the file (its data fingerprint); --no-train: never",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=40,
        help="maximum training epochs of a model the demo trains (default 40)",
    )
    p.add_argument("--workdir", default="var/demo", help="logs, state and the DuckDB file (default var/demo)")
    p.add_argument("--exit", action="store_true", help="stop after printing the results (non-interactive)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="throughput, latency, scoring and state benchmarks")
    bench_sub = p.add_subparsers(dest="what", required=True, parser_class=_Parser)
    for name, doc in (
        ("throughput", "raw aiokafka vs bare faust agent vs the same fold in Quix Streams vs the full worker path"),
        ("latency", "event time to score readable, at steady publish rates"),
        ("scoring", "onnxruntime (and torch) customers/s by batch size"),
        ("state", "memory per customer held, recovery and restart time, per store"),
        (
            "bootstrap",
            "clv bootstrap of a synthetic file: lines/s end to end, and whether its scores equal clv score's",
        ),
        ("sink", "snapshot sink: seconds per snapshot and peak RSS (no broker)"),
        ("api", "analyst API under concurrent clients: requests/s, p50 and p99 per endpoint mix (no broker)"),
        (
            "month-turn",
            "a worker holding a bootstrapped population enters a new "
            "month: seconds until every customer's new score is published, and the "
            "latency of ordinary events meanwhile",
        ),
    ):
        b = bench_sub.add_parser(name, help=doc)
        b.add_argument("--json", default=None, help="write the figures as JSON here")
        b.add_argument("--workdir", default=None, help="logs and state (default: a temp dir)")
        if name not in ("scoring", "sink", "api"):  # those three measure without a broker
            b.add_argument("--bootstrap", default=None, help="Kafka to use (default: the embedded broker)")
        b.set_defaults(func=cmd_bench)
        if name in ("throughput", "latency"):
            b.add_argument("--invoices", type=_positive_int, default=100_000, help="invoice events (default 100000)")
            b.add_argument("--customers", type=_positive_int, default=20_000, help="customers (default 20000)")
        if name == "throughput":
            b.add_argument("--partitions", type=_positive_int, default=4, help="partitions (default 4)")
            b.add_argument("--repeats", type=_positive_int, default=3, help="runs of each path (default 3)")
        if name == "latency":
            b.add_argument(
                "--rate",
                type=_positive_float,
                nargs="+",
                default=None,
                help="events/s to hold (default: 25%% and 50%% of the measured maximum)",
            )
            b.add_argument("--max-rate", type=_positive_float, default=None, help="skip measuring the maximum")
            b.add_argument("--seconds", type=_positive_float, default=20.0, help="seconds per rate (default 20)")
            b.add_argument(
                "--linger-ms",
                type=_non_negative_int,
                default=5,
                help="the publisher's linger (default 5, the Java client's and librdkafka's default)",
            )
        if name == "scoring":
            b.add_argument(
                "--batch-sizes", type=_positive_int, nargs="+", default=[1, 8, 64, 256, 1024, 4096], help="batch sizes"
            )
            b.add_argument("--seconds", type=_positive_float, default=1.0, help="seconds per measurement (default 1)")
            b.add_argument("--model", default=None, help="artifact directory (default: shipped)")
        if name == "bootstrap":
            b.add_argument(
                "--lines", type=_positive_int, default=2_000_000, help="lines in the history file (default 2000000)"
            )
        if name == "state":
            b.add_argument("--customers", type=_positive_int, default=100_000, help="customers (default 100000)")
            b.add_argument("--stores", nargs="+", default=["memory://"], help="stores to measure")
        if name in ("throughput", "latency", "state", "month-turn"):
            worker_default = f"the worker's session_timeout_s, {Settings.model_fields['session_timeout_s'].default:g}"
            default = {"state": "10", "throughput": "each framework's"}.get(name, worker_default)
            b.add_argument(
                "--session-timeout",
                type=_positive_float,
                default=None,
                help=f"consumer group session timeout of the processes measured, in seconds (default: {default}; "
                "the embedded broker holds every group join for half of it)",
            )
        if name in ("sink", "month-turn"):
            b.add_argument("--customers", type=_positive_int, default=1_000_000, help="customers (default 1000000)")
        if name == "api":
            b.add_argument("--customers", type=_positive_int, default=100_000, help="customers (default 100000)")
            b.add_argument("--clients", type=_positive_int, default=32, help="concurrent clients (default 32)")
            b.add_argument("--seconds", type=_positive_float, default=10.0, help="seconds per mix (default 10)")
        if name == "month-turn":
            b.add_argument(
                "--rate",
                type=_positive_float,
                default=200.0,
                help="ordinary events/s published before and through the turn (default 200)",
            )

    p = sub.add_parser("rescore-all", help="ask the workers to rescore every customer (model rollout)")
    _kafka_args(p)
    p.set_defaults(func=cmd_rescore_all)

    p = sub.add_parser("snapshot", help="consume clv-scores and publish DuckDB snapshots")
    _kafka_args(p)
    _snapshot_args(p)
    _setting_arg(p, "snapshot_interval_s", "--interval")
    _setting_arg(p, "model_dir", "--model")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("query", help="ask the snapshot: top, segments, clusters, customer ID, summary, sql TEXT")
    p.add_argument("what", choices=("top", "segments", "clusters", "customer", "summary", "sql"))
    p.add_argument("arg", nargs="?", default=None, help="customer id (customer) or SQL text (sql)")
    p.add_argument("--n", type=_positive_int, default=20, help="top: how many (default 20)")
    _selection_args(p, "top")
    p.add_argument("--json", action="store_true", help="print JSON")
    _snapshot_args(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("export", help="write the snapshot's customers to CSV or Parquet")
    p.add_argument("--out", required=True, help="FILE.csv or FILE.parquet")
    _selection_args(p, "export")
    _snapshot_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "api", help="serve top-N, segments, clusters, customers, exports and SQL over HTTP, and score uploaded files"
    )
    _snapshot_args(p)
    for name, flag in (
        ("api_host", "--host"),
        ("api_port", "--port"),
        ("api_sql_timeout_s", "--sql-timeout-s"),
        ("api_sql_max_rows", "--sql-max-rows"),
        ("api_rate_limit_per_min", "--rate-limit-per-min"),
        ("api_audit_log", "--audit-log"),
        ("model_dir", "--model"),
        ("api_score_max_bytes", "--score-max-bytes"),
    ):
        _setting_arg(p, name, flag)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("dashboard", help="the analysts' dashboard (Streamlit) over the snapshot")
    _snapshot_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=_positive_int, default=8501, help="port (default 8501)")
    p.add_argument("--model", default=None, help="artifact directory for the model card (default: the shipped model)")
    p.add_argument(
        "--screenshot",
        default=None,
        metavar="OUT.png",
        help="photograph the whole page in headless Chromium into OUT.png and stop",
    )
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("config", help="print resolved settings with their environment variables")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "what", None) in ("customer", "sql") and not args.arg:
            raise UsageError(f"query {args.what} needs its argument (a customer id or SQL text)")
        settings = _settings(args)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return args.func(args)
    except (UsageError, LoadError, SettingsError, TokenRequired, ArtifactError, QueryError) as exc:
        print(f"clv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
