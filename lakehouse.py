"""The `lakehouse` command: wires subcommands to `pipeline`, `serve` and `lake`, importing each lazily."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from lake.settings import Settings

app = typer.Typer(
    help="A streaming lakehouse for device telemetry: Kafka -> Spark -> Delta (bronze, silver, gold, quarantine) -> DuckDB -> HTTP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
kafka_app = typer.Typer(
    help="Run the local Apache Kafka broker, or a local cluster of brokers (KRaft), and create the topic.",
    no_args_is_help=True,
)
app.add_typer(kafka_app, name="kafka")
console = Console(stderr=True, soft_wrap=True)
_overrides: dict[str, object] = {}


def settings() -> Settings:
    return Settings(**_overrides)  # flags win over LAKEHOUSE_* variables, which win over defaults


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(1)


@app.callback()
def main(
    kafka_bootstrap: Annotated[Optional[str], typer.Option(help="Kafka bootstrap servers (env LAKEHOUSE_KAFKA_BOOTSTRAP, default localhost:9092)")] = None,
    topic: Annotated[Optional[str], typer.Option(help="topic (env LAKEHOUSE_TOPIC, default device-data)")] = None,
    topic_partitions: Annotated[Optional[int], typer.Option(help="partitions of a new topic (env LAKEHOUSE_TOPIC_PARTITIONS, default 4)")] = None,
    topic_replication: Annotated[Optional[int], typer.Option(help="replicas of a new topic's partitions (env LAKEHOUSE_TOPIC_REPLICATION, default: the cluster's)")] = None,
    topic_min_insync_replicas: Annotated[Optional[int], typer.Option(help="min.insync.replicas of a new topic (env LAKEHOUSE_TOPIC_MIN_INSYNC_REPLICAS, default: the cluster's)")] = None,
    kafka_properties: Annotated[Optional[Path], typer.Option(help="Kafka client properties file: security.protocol, sasl.*, ssl.* (env LAKEHOUSE_KAFKA_PROPERTIES)")] = None,
    max_message_bytes: Annotated[Optional[int], typer.Option(help="message size limit on every layer (env LAKEHOUSE_MAX_MESSAGE_BYTES, default 5242880)")] = None,
    lake_root: Annotated[Optional[str], typer.Option(help="folder or URI of the Delta tables (env LAKEHOUSE_LAKE_ROOT, default data/lake)")] = None,
    checkpoint_root: Annotated[Optional[str], typer.Option(help="folder or URI of checkpoints (env LAKEHOUSE_CHECKPOINT_ROOT, default <lake-root>/_checkpoints)")] = None,
    home: Annotated[Optional[Path], typer.Option(help="local state: jars, local broker (env LAKEHOUSE_HOME, default .lakehouse)")] = None,
    spark_master: Annotated[Optional[str], typer.Option(help="Spark master (env LAKEHOUSE_SPARK_MASTER, default local[*])")] = None,
    spark_driver_memory: Annotated[Optional[str], typer.Option(help="Spark driver heap (env LAKEHOUSE_SPARK_DRIVER_MEMORY, default 2g)")] = None,
    spark_executor_memory: Annotated[Optional[str], typer.Option(help="Spark executor heap on a cluster (env LAKEHOUSE_SPARK_EXECUTOR_MEMORY, default Spark's 1g)")] = None,
    shuffle_partitions: Annotated[Optional[int], typer.Option(help="Spark shuffle partitions (env LAKEHOUSE_SHUFFLE_PARTITIONS, default 4)")] = None,
    trigger_interval: Annotated[Optional[str], typer.Option(help="micro-batch interval (env LAKEHOUSE_TRIGGER_INTERVAL, default '1 second')")] = None,
    max_offsets_per_trigger: Annotated[Optional[int], typer.Option(help="Kafka records per micro-batch (env LAKEHOUSE_MAX_OFFSETS_PER_TRIGGER, default 2000)")] = None,
    starting_offsets: Annotated[Optional[str], typer.Option(help="earliest|latest for a new checkpoint (env LAKEHOUSE_STARTING_OFFSETS, default earliest)")] = None,
    fail_on_data_loss: Annotated[Optional[bool], typer.Option(help="stop when Kafka lost unread offsets (env LAKEHOUSE_FAIL_ON_DATA_LOSS, default true)")] = None,
    extra_timestamp_formats: Annotated[Optional[list[str]], typer.Option("--extra-timestamp-format", help="strptime pattern accepted besides ISO 8601, repeatable (env LAKEHOUSE_EXTRA_TIMESTAMP_FORMATS, a JSON list)")] = None,
    http_host: Annotated[Optional[str], typer.Option(help="API listen address (env LAKEHOUSE_HTTP_HOST, default 127.0.0.1)")] = None,
    http_port: Annotated[Optional[int], typer.Option(help="API port (env LAKEHOUSE_HTTP_PORT, default 8000)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log more")] = False,
) -> None:
    """Every setting is a flag here and a LAKEHOUSE_* environment variable; flags win."""
    given = {name: value for name, value in locals().items() if name != "verbose" and value not in (None, [])}
    _overrides.clear()
    _overrides.update(given)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)  # py4j logs every callback at INFO
    try:
        settings()
    except Exception as exc:  # pydantic's ValidationError names the setting and the problem
        _fail(str(exc))


@app.command()
def setup(force: Annotated[bool, typer.Option(help="resolve again even if the jars are there")] = False) -> None:
    """Resolve the JVM jars (Delta, Spark's Kafka source, the Kafka broker) with Maven into <home>/jars."""
    from pipeline.jvm import jars
    from lake.errors import LakeError
    from pipeline.errors import PipelineError

    try:
        with console.status("resolving JVM jars with Maven"):
            counts = jars.resolve(settings().home, force=force)
    except (PipelineError, LakeError) as exc:
        _fail(str(exc))
    console.print(f"jars ready: {counts['spark']} for Spark, {counts['kafka']} for the Kafka broker")


@kafka_app.command("start")
def kafka_start(
    brokers: Annotated[
        int,
        typer.Option(min=1, help="local brokers; 3 from localhost:9092 listen on 9092, 9094, 9096 (controllers on 9093, ...)"),
    ] = 1,
) -> None:
    """Start the local broker, or a cluster of brokers (formatting storage on first start), and create the topic."""
    from pipeline.kafka.broker import LocalBroker, LocalCluster, ensure_topic
    from lake.errors import LakeError
    from pipeline.errors import PipelineError

    current = settings()
    try:
        if brokers == 1:
            broker = LocalBroker.from_settings(current)
            with console.status(f"starting Kafka on {broker.host}:{broker.port}"):
                pid = broker.start()
                created = ensure_topic(current)
            running = f"Kafka broker running (pid {pid}) on {broker.host}:{broker.port}"
        else:
            cluster = LocalCluster.from_settings(current, brokers)
            with console.status(f"starting {brokers} Kafka brokers on {cluster.bootstrap}"):
                pids = cluster.start()
                created = ensure_topic(current.model_copy(update={"kafka_bootstrap": cluster.bootstrap}))
            running = f"{brokers} Kafka brokers running (pids {', '.join(map(str, pids))}) on {cluster.bootstrap}"
    except (PipelineError, LakeError) as exc:
        _fail(str(exc))
    state = "created" if created else "exists"
    console.print(f"{running}; topic {current.topic!r} {state}")
    if brokers > 1 and current.kafka_bootstrap != cluster.bootstrap:
        console.print(f"give clients every broker, so that they ride through one going down: "
                      f"export LAKEHOUSE_KAFKA_BOOTSTRAP={cluster.bootstrap}")  # fmt: skip


@kafka_app.command("stop")
def kafka_stop() -> None:
    """Stop the local broker, or every broker of the local cluster on this bootstrap address."""
    from pipeline.kafka.broker import LocalBroker, LocalCluster

    current = settings()
    cluster = LocalCluster.existing(current)
    stopped_nodes = cluster.stop() if cluster is not None else 0
    if stopped_nodes:
        console.print(f"{stopped_nodes} Kafka brokers stopped")
        return
    stopped = LocalBroker.from_settings(current).stop()
    console.print("Kafka broker stopped" if stopped else "Kafka broker was not running")


@kafka_app.command("status")
def kafka_status() -> None:
    """Are the local brokers running, and what does the cluster report (brokers, partitions, replicas in sync)?"""
    from pipeline.kafka.broker import LocalBroker, LocalCluster, describe

    current = settings()
    cluster = LocalCluster.existing(current)
    for node in cluster.nodes if cluster else [LocalBroker.from_settings(current)]:
        pid = node.pid()
        console.print(f"local broker {node.host}:{node.port}: {'running, pid ' + str(pid) if pid else 'not running'}")
    try:
        info = describe(current)
    except Exception as exc:
        _fail(f"cannot reach Kafka at {current.kafka_bootstrap}: {exc}")
    console.print(f"cluster: brokers {info['brokers']}, topic {info['topic']!r} partitions {info['partitions']}, "
                  f"replicas {info['replicas']}, under-replicated partitions {info['under_replicated']}")  # fmt: skip


@app.command()
def produce(
    path: Annotated[Optional[Path], typer.Argument(help="NDJSON file, one message per line; '-' for stdin")] = None,
    synthetic: Annotated[bool, typer.Option(help="send a generated device fleet instead of a file")] = False,
    devices: Annotated[int, typer.Option(help="synthetic: number of devices")] = 20,
    messages: Annotated[int, typer.Option(help="synthetic: number of messages")] = 2000,
    batch_share: Annotated[float, typer.Option(help="synthetic: share of messages that are batches")] = 0.1,
    full_batches: Annotated[int, typer.Option(help="synthetic: batches filled up to the message size limit")] = 1,
    span_seconds: Annotated[int, typer.Option(help="synthetic: readings spread over this many seconds")] = 600,
    start: Annotated[str, typer.Option(help="synthetic: time of the first reading")] = "2024-07-30T12:00:00Z",
    seed: Annotated[int, typer.Option(help="synthetic: random seed")] = 7,
    save: Annotated[Optional[Path], typer.Option(help="synthetic: also write the messages to this NDJSON file")] = None,
    rate: Annotated[float, typer.Option(help="messages per second; 0 sends as fast as possible")] = 0.0,
) -> None:
    """Send NDJSON lines (or a synthetic fleet) to the topic, keyed by device_id."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from lake.timestamps import from_us, parse_timestamp_us
    from lake.errors import LakeError
    from pipeline.errors import PipelineError
    from pipeline.kafka.produce import produce as send
    from pipeline.kafka.synthetic import Fleet, generate

    current = settings()
    if synthetic == (path is not None):
        _fail("give either a PATH (or '-') or --synthetic")
    total: int | None = None  # bytes to send, for the progress bar, when known
    resources = ExitStack()
    if synthetic:
        fleet = Fleet(
            devices=devices, messages=messages, batch_share=batch_share, full_batches=full_batches,
            max_message_bytes=current.max_message_bytes, start=from_us(parse_timestamp_us(start)),
            span_seconds=span_seconds, seed=seed,
        )  # fmt: skip
        source = generate(fleet)
        if save is not None:
            lines = list(source)
            save.write_bytes(b"".join(line + b"\n" for line in lines))
            source = iter(lines)
    elif str(path) == "-":
        source = iter(sys.stdin.buffer)
    else:
        assert path is not None
        if not path.is_file():
            _fail(f"no such file: {path}")
        total = path.stat().st_size
        source = resources.enter_context(path.open("rb"))
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    try:
        with resources, Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("produce", total=total)
            report = send(current, source, on_progress=lambda n: progress.advance(task, n), rate=rate)
        console.print(f"sent {report.sent:,} messages ({report.bytes:,} bytes) to {current.topic!r}"
                      + (f"; {report.blank_lines} blank lines ignored" if report.blank_lines else ""))  # fmt: skip
        report.raise_for_problems(current.max_message_bytes)
    except (PipelineError, LakeError) as exc:
        _fail(str(exc))


@app.command()
def pipeline(
    available_now: Annotated[bool, typer.Option("--available-now", help="process what Kafka holds, then exit")] = False,
    report: Annotated[
        Optional[Path], typer.Option(help="append one JSON line per micro-batch (counts, seconds per stage) to this file")
    ] = None,
) -> None:
    """Run the streaming job Kafka -> bronze/silver/gold/quarantine (continuous unless --available-now)."""
    from lake.errors import LakeError
    from pipeline.errors import PipelineError
    from pipeline.stream.job import run

    current = settings()
    try:
        reports = run(current, available_now=available_now, report_file=report)
    except (PipelineError, LakeError) as exc:
        _fail(str(exc))
    records = sum(r.records for r in reports)
    readings = sum(r.readings for r in reports)
    quarantined = sum(r.quarantined for r in reports)
    console.print(f"{len(reports)} micro-batches: {records:,} records, {readings:,} readings, {quarantined:,} quarantined")


@app.command()
def audit(
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    kafka: Annotated[bool, typer.Option(help="also ask Kafka for each partition's offsets")] = True,
) -> None:
    """Account for every Kafka record and check that nothing was lost; exits 1 when a check fails.

    Per partition: records in Kafka and bronze, readings accepted and quarantined. Each bronze record is re-read
    with the current rules: each valid reading must be in silver, each invalid one in quarantine."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table as RichTable

    from lake.errors import LakeError
    from pipeline.ops.audit import audit as run_audit

    columns = (TextColumn("re-reading bronze"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True, disable=as_json) as progress:
            task = progress.add_task("audit", total=None)
            report = run_audit(settings(), lambda done, total: progress.update(task, completed=done, total=total), kafka)
    except LakeError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        raise typer.Exit(0 if report.ok else 1)
    out = Console()
    counts = RichTable("topic", "part.", "Kafka offsets", "bronze", "to ingest", "readings", "accepted",
                       "quar. readings", "quar. messages", "lost offsets", title="accounting per partition")  # fmt: skip
    for p in report.partitions:
        kafka_range = "?" if p.kafka_end_offset is None else f"{p.kafka_first_offset:,}..{p.kafka_end_offset - 1:,}"
        counts.add_row(p.topic, str(p.partition), kafka_range, f"{p.bronze_records:,}",
                       "?" if p.not_yet_ingested is None else f"{p.not_yet_ingested:,}", f"{p.readings_in_messages:,}",
                       f"{p.readings_accepted:,}", f"{p.readings_quarantined:,}", f"{p.messages_quarantined:,}",
                       f"{p.offsets_lost:,}")  # fmt: skip
    totals = report.totals()
    counts.add_row("total", "", "", f"{totals['bronze_records']:,}", "", f"{totals['readings_in_messages']:,}",
                   f"{totals['readings_accepted']:,}", f"{totals['readings_quarantined']:,}",
                   f"{totals['messages_quarantined']:,}", f"{totals['offsets_lost']:,}", style="bold")  # fmt: skip
    out.print(counts)
    if report.kafka_error:
        console.print(f"[yellow]Kafka:[/] {escape(report.kafka_error)}")
    checks = RichTable("check", "result", title="checks")
    for check in report.checks:
        checks.add_row(check.name, "[green]ok[/]" if check.ok else f"[red]FAIL[/] {escape(check.detail)}")
    out.print(checks)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json", help="print the findings as JSON")] = False) -> None:
    """Check the set-up and say which setting to change; exits 1 when a check fails.

    Java, jars, DuckDB's delta extension, Kafka and the topic, message size limits on every layer (producer <=
    topic <= broker, consumer), the checkpoint, the lake's disk."""
    from rich.table import Table as RichTable

    from pipeline.ops.doctor import FAIL, WARN, as_dicts, diagnose

    with console.status("checking") as status:
        findings = diagnose(settings(), lambda step: status.update(f"checking {step}"))
    failed = any(f.status == FAIL for f in findings)
    if as_json:
        print(json.dumps(as_dicts(findings), indent=2))
        raise typer.Exit(1 if failed else 0)
    table = RichTable("check", "status", "detail", "what to do", show_lines=True)
    style = {FAIL: "[bold red]FAIL[/]", WARN: "[yellow]warn[/]"}
    for f in findings:
        table.add_row(f.check, style.get(f.status, "[green]ok[/]"), escape(f.detail), escape(f.fix))
    Console().print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def replay(
    reason: Annotated[Optional[str], typer.Option(help="only quarantine rows with this reason code")] = None,
    since: Annotated[Optional[str], typer.Option(help="only rows quarantined at or after this instant (ISO 8601)")] = None,
) -> None:
    """Re-evaluate quarantined rows with the current rules; now-valid readings move into silver and gold.

    For example after adding --extra-timestamp-format. Each now-valid reading moves exactly once; the rest keep an
    updated reason. Safe to run again, or while the pipeline runs."""
    from lake.timestamps import TimestampError, from_us, parse_timestamp_us
    from lake.errors import LakeError
    from pipeline.errors import PipelineError
    from pipeline.ops.replay import replay as run_replay

    current = settings()
    try:
        since_at = None if since is None else from_us(parse_timestamp_us(since))
    except TimestampError as exc:
        _fail(f"--since: {exc}")
    try:
        with console.status("replaying quarantine with the current rules"):
            report = run_replay(current, reason, since_at)
    except (PipelineError, LakeError, ValueError) as exc:
        _fail(str(exc))
    console.print(
        f"replayed {report.quarantined_rows:,} quarantine rows from {report.records:,} Kafka records: "
        f"{report.readings_accepted:,} readings now valid (merged into silver and gold), "
        f"{report.still_invalid:,} rows still quarantined ({report.reasons_changed:,} with a new reason)"
    )


@app.command()
def maintain(
    table: Annotated[Optional[list[str]], typer.Option(help="only this table (repeatable): bronze|silver|gold|quarantine")] = None,
    retain_hours: Annotated[float, typer.Option(help="VACUUM keeps files younger than this; under 168 needs care")] = 168,
    vacuum: Annotated[bool, typer.Option(help="delete files no longer in the table and older than --retain-hours")] = True,
    unsafe_retention: Annotated[
        bool, typer.Option(help="allow --retain-hours under 1; only when no pipeline or other writer is running")
    ] = False,
) -> None:
    """Compact small files (OPTIMIZE), write Delta checkpoints and VACUUM; safe while the pipeline runs."""
    from rich.table import Table as RichTable

    from lake.maintenance import UnsafeRetention, check_retention
    from lake.maintenance import maintain as run_maintenance
    from lake.tables import LakePaths, Table
    from lake.errors import LakeError
    from pipeline.errors import PipelineError
    from pipeline.stream.spark import build_session

    current = settings()
    try:
        chosen = [Table(name) for name in table] if table else None
    except ValueError as exc:
        _fail(str(exc))
    try:
        check_retention(retain_hours, unsafe_retention)  # before Spark starts, for a quick answer
    except UnsafeRetention as exc:
        _fail(str(exc))
    if retain_hours < 168:
        console.print(f"[yellow]warning:[/] --retain-hours {retain_hours:g} is under 168: a reader on an older "
                      "table version, or time travel to one, may fail")  # fmt: skip
    try:
        spark = build_session(current, app_name="kpi-lakehouse-maintain")
    except (PipelineError, LakeError) as exc:
        _fail(str(exc))
    reports = run_maintenance(spark, LakePaths.from_settings(current), chosen, retain_hours, vacuum, unsafe_retention)
    summary = RichTable("table", "live files before", "compacted", "live files after", "deleted from storage", "version")
    for r in reports:
        summary.add_row(r.table, str(r.live_files_before), str(r.files_compacted), str(r.live_files_after),
                        str(r.files_vacuumed), str(r.version))  # fmt: skip
    Console().print(summary)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="a small smoke run (about two minutes) instead of the full sizes")] = False,
    part: Annotated[Optional[list[str]], typer.Option(help="only this part (repeatable): ingest|freshness|lookups")] = None,
    folder: Annotated[Path, typer.Option(help="work folder (deleted and made again)")] = Path("data/bench"),
    port: Annotated[int, typer.Option(help="port of the benchmark's own Kafka broker (and the next one)")] = 19492,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the figures to this JSON file")] = None,
    markdown_out: Annotated[Optional[Path], typer.Option("--markdown", help="also write the table to this file")] = None,
) -> None:
    """Measure ingest, freshness and lookups beside references measured in the same run.

    Prints figure, ours, reference, ratio, goal and whether it is met. Starts its own Kafka broker, pipeline and
    API in --folder; see BENCHMARKS.md."""
    from rich.table import Table as RichTable

    from bench.run import PARTS, Plan, as_json, markdown, run

    chosen = part or list(PARTS)
    unknown = set(chosen) - set(PARTS)
    if unknown:
        _fail(f"unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    current = settings().model_copy(update={"kafka_bootstrap": f"localhost:{port}"})
    with console.status("benchmark") as status:
        figures = run(current, Plan.quick() if quick else Plan(), chosen, folder.resolve(),
                      lambda text: (status.update(text), console.log(text)))  # fmt: skip
    table = RichTable("figure", "ours", "reference", "ratio", "goal", "met", title="kpi-lakehouse bench")
    for f in figures:
        reference = f"{f.reference:,.2f} {f.unit}\n{f.reference_name}" if f.reference is not None else ""
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[f.met]
        table.add_row(f.name, f"{f.ours:,.2f} {f.unit}", reference, f"{f.ratio:.3g}" if f.ratio else "", f.goal, met)
    Console(width=160).print(table)
    for f in figures:
        if f.note:
            console.print(f"{f.name}: {f.note}")
    command = "lakehouse bench" + (" --quick" if quick else "") + "".join(f" --part {p}" for p in part or [])
    if json_out:
        json_out.write_text(json.dumps(as_json(figures), indent=2))
    if markdown_out:
        markdown_out.write_text(markdown(figures, command))


@app.command()
def serve(
    port: Annotated[Optional[int], typer.Option(help="port (overrides --http-port / LAKEHOUSE_HTTP_PORT)")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    refresh_seconds: Annotated[Optional[float], typer.Option(help="look for new table versions this often (env LAKEHOUSE_API_REFRESH_SECONDS, default 1)")] = None,
    rate_limit: Annotated[Optional[int], typer.Option(help="requests per minute per client, 0 = off (env LAKEHOUSE_API_RATE_LIMIT, default 0)")] = None,
    cors_origins: Annotated[Optional[str], typer.Option(help="comma-separated CORS origins, empty = CORS off (env LAKEHOUSE_API_CORS_ORIGINS)")] = None,
    max_range_buckets: Annotated[Optional[int], typer.Option(help="most buckets a /kpis range spans (env LAKEHOUSE_API_MAX_RANGE_BUCKETS, default 1000000)")] = None,
    kafka_timeout_seconds: Annotated[Optional[float], typer.Option(help="wait for Kafka offsets in /health (env LAKEHOUSE_API_KAFKA_TIMEOUT_SECONDS, default 2)")] = None,
) -> None:
    """Run the HTTP API and dashboard: GET /, /kpis, /kpis/{timestamp}, /devices, /health, /metrics, OpenAPI at /schema."""
    import uvicorn

    if port is not None:
        _overrides["http_port"] = port
    api_flags = {"api_refresh_seconds": refresh_seconds, "api_rate_limit": rate_limit, "api_cors_origins": cors_origins,
                 "api_max_range_buckets": max_range_buckets, "api_kafka_timeout_seconds": kafka_timeout_seconds}  # fmt: skip
    _overrides.update({name: value for name, value in api_flags.items() if value is not None})
    current = settings()
    # The app factory reads settings from the environment, also in worker processes.
    for name, value in _overrides.items():
        os.environ[f"LAKEHOUSE_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    # The app logs each request as a JSON line itself, so uvicorn's access log stays off.
    uvicorn.run("serve.app:create_app", factory=True, host=current.http_host, port=current.http_port,
                workers=workers, log_level="info", access_log=False)  # fmt: skip


@app.command()
def sql(
    query: Annotated[Optional[str], typer.Argument(help="SQL to run; without it, an interactive prompt")] = None,
    output: Annotated[str, typer.Option(help="table|csv|json")] = "table",
    export_to: Annotated[
        Optional[Path],
        typer.Option("--export", help="write the four tables into this DuckDB database file (a snapshot) and exit"),
    ] = None,
) -> None:
    """DuckDB over the lake, with views bronze, silver, gold and quarantine."""
    from lake.duck import connect
    from lake.errors import LakeError
    from lake.sql import export, interactive, run_query
    from lake.tables import LakePaths

    try:
        connection = connect(LakePaths.from_settings(settings()))
    except LakeError as exc:
        _fail(str(exc))
    if export_to is not None:
        with console.status(f"exporting to {export_to}"):
            counts = export(connection, str(export_to))
        console.print(f"wrote {export_to}: " + ", ".join(f"{name} {rows:,} rows" for name, rows in counts.items()))
        console.print(f"open it with: duckdb {export_to}")
        return
    if query is None:
        interactive(connection)
        return
    try:
        run_query(connection, query, output, sys.stdout)
    except Exception as exc:  # DuckDB's own message says what is wrong with the query
        _fail(str(exc))


if __name__ == "__main__":
    app()
