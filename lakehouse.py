"""The `lakehouse` command: wires subcommands to `pipeline`, `serve` and `lake`, importing each lazily."""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from typer.core import TyperCommand, TyperGroup, TyperOption

from lake.settings import SettingFlag, Settings, setting_flags

F = TypeVar("F", bound=Callable[..., None])
ClickContext = Any  # the click Context that typer vendors and does not export
SETTING_FLAGS = {flag.name: flag for flag in setting_flags()}

SETTINGS_NOTE = (
    "Every setting is a flag of lakehouse itself, given before the command (lakehouse --lake-root /data/lake "
    "pipeline), and a LAKEHOUSE_* environment variable; flags win over variables, variables over defaults."
)


def _print_panels(ctx: ClickContext, params: list[Any]) -> None:
    """Options in panels of two columns, the flags and their help, with a setting's variable and default on a line of
    their own: typer's panels add three more columns, which leave an 80-column terminal too little room for the help
    and cut long LAKEHOUSE_* names."""
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text
    from typer import rich_utils

    panels: dict[str, Table] = {}
    for param in params:
        panel = getattr(param, "rich_help_panel", None) or "Options"
        table = panels.setdefault(panel, Table(box=None, show_header=False, expand=True, pad_edge=False))
        if not table.columns:
            table.add_column(no_wrap=True, style=rich_utils.STYLE_OPTION)
            table.add_column(ratio=1)
        flags = Text("\n".join([", ".join(param.opts), *param.secondary_opts]))
        if isinstance(param, TyperOption) and not param.is_flag:
            flags.append(" " + str(param.display_type_rich(ctx)), style=rich_utils.STYLE_TYPES)
        help_text = Text(getattr(param, "help", None) or "")
        setting = SETTING_FLAGS.get(param.name or "")
        if setting is not None:
            help_text.append(f"\n{setting.env}, default {setting.default}", style="dim")
        table.add_row(flags, help_text)
    console = Console()
    for panel, table in panels.items():
        console.print(Panel(table, title=panel, title_align="left", border_style="dim"))


@contextmanager
def _showing(command: Any, params: list[Any]) -> Iterator[None]:
    """Let typer's help show only these of the command's parameters (--help among them or not)."""
    saved = command.params, command.add_help_option
    command.params = [param for param in params if param.name != "help"]
    command.add_help_option = any(param.name == "help" for param in params)
    try:
        yield
    finally:
        command.params, command.add_help_option = saved


class LakehouseGroup(TyperGroup):
    """The root command. Its help lists the commands first, then the options and the settings in panels; it turns
    the packages' errors (whose messages say what to do) into one red line and exit status 1, for every command."""

    def invoke(self, ctx: ClickContext) -> object:
        from pydantic import ValidationError

        from lake.errors import LakeError
        from pipeline.errors import PipelineError

        try:
            return super().invoke(ctx)
        except (PipelineError, LakeError, ValidationError) as exc:  # pydantic's message names the setting
            _fail(str(exc))

    def format_help(self, ctx: ClickContext, formatter: Any) -> None:
        params = self.get_params(ctx)
        with _showing(self, []):  # typer would print the options before the commands
            super().format_help(ctx, formatter)  # usage, summary, commands
        _print_panels(ctx, [param for param in params if param.name not in SETTING_FLAGS])
        Console().print(Padding(SETTINGS_NOTE, (1, 1)))
        _print_panels(ctx, [param for param in params if param.name in SETTING_FLAGS])


class ServeCommand(TyperCommand):
    """`serve`, whose API settings show in a panel of their own with their variables and defaults."""

    def format_help(self, ctx: ClickContext, formatter: Any) -> None:
        params = self.get_params(ctx)
        with _showing(self, [param for param in params if param.name not in SETTING_FLAGS]):
            super().format_help(ctx, formatter)
        _print_panels(ctx, [param for param in params if param.name in SETTING_FLAGS])


app = typer.Typer(
    cls=LakehouseGroup,
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
s3_app = typer.Typer(
    help="Run a local S3 API server (S3Proxy, buckets in memory) for a lake on s3a://, for tests and demos.",
    no_args_is_help=True,
)
app.add_typer(s3_app, name="s3")
console = Console(stderr=True, soft_wrap=True)
_overrides: dict[str, object] = {}


def settings() -> Settings:
    return Settings.model_validate(_overrides)  # flags win over LAKEHOUSE_* variables, which win over defaults


def _fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(1)


def _with_setting_flags(flags: list[SettingFlag], name: Callable[[SettingFlag], str]) -> Callable[[F], F]:
    """Give a command one option per setting, named `name(flag)`, with the setting's type, help, variable and
    default; the command's **kwargs receive the options given (None when left out)."""

    def add_options(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [param for param in signature.parameters.values() if param.kind is not param.VAR_KEYWORD]
        options = [
            inspect.Parameter(
                flag.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=flag.value_type | None,
                default=typer.Option(
                    None,
                    name(flag) + (f"/--no-{name(flag)[2:]}" if flag.value_type is bool else ""),
                    help=flag.description,
                    show_default=False,  # _print_panels shows it beside the variable
                    rich_help_panel=flag.panel,
                ),
            )
            for flag in flags
        ]
        command.__signature__ = signature.replace(parameters=[*own, *options])  # type: ignore[attr-defined]
        return command

    return add_options


def _given(flags: dict[str, object]) -> dict[str, object]:
    return {name: value for name, value in flags.items() if value not in (None, [])}


@app.callback()
@_with_setting_flags(list(SETTING_FLAGS.values()), lambda flag: flag.flag)
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log more")] = False, **flags: object) -> None:
    """Every setting is a flag here and a LAKEHOUSE_* environment variable; flags win."""
    _overrides.clear()
    _overrides.update(_given(flags))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)  # py4j logs every callback at INFO
    settings()  # a bad setting fails here, before any command starts


@app.command()
def setup(force: Annotated[bool, typer.Option(help="resolve again even if the jars are there")] = False) -> None:
    """Resolve the JVM jars (Delta, Spark's Kafka source and s3a, the Kafka broker, S3Proxy) with Maven into <home>/jars."""
    from pipeline.jvm import jars

    with console.status("resolving JVM jars with Maven"):
        counts = jars.resolve(settings().home, force=force)
    console.print(
        f"jars ready: {counts['spark']} for Spark, {counts['kafka']} for the Kafka broker, {counts['s3proxy']} for S3Proxy"
    )


@kafka_app.command("start")
def kafka_start(
    brokers: Annotated[
        int,
        typer.Option(
            min=1, help="local brokers; 3 from localhost:9092 listen on 9092, 9094, 9096 (controllers on 9093, ...)"
        ),
    ] = 1,
) -> None:
    """Start the local broker, or a cluster of brokers (formatting storage on first start), and create the topic."""
    from pipeline.kafka.broker import LocalBroker, LocalCluster, ensure_topic

    current = settings()
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
    state = "created" if created else "exists"
    console.print(f"{running}; topic {current.topic!r} {state}")
    if brokers > 1 and current.kafka_bootstrap != cluster.bootstrap:
        console.print(
            "give clients every broker, so that they ride through one going down: "
            f"export LAKEHOUSE_KAFKA_BOOTSTRAP={cluster.bootstrap}"
        )


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
    except Exception as exc:  # noqa: BLE001 - whatever stops the admin client, the user reads why
        _fail(f"cannot reach Kafka at {current.kafka_bootstrap}: {exc}")
    console.print(
        f"cluster: brokers {info['brokers']}, topic {info['topic']!r} partitions {info['partitions']}, "
        f"replicas {info['replicas']}, under-replicated partitions {info['under_replicated']}"
    )


S3_PORT = typer.Option(help="port the local S3 server listens on (127.0.0.1)")


@s3_app.command("start")
def s3_start(
    port: Annotated[int, S3_PORT] = 9000,
    bucket: Annotated[list[str] | None, typer.Option(help="bucket to create (repeatable)")] = None,
) -> None:
    """Start S3Proxy (credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or fixed ones) and create buckets."""
    from pipeline.s3server import LocalS3Server

    server = LocalS3Server.from_env(settings().home, port)
    with console.status(f"starting S3Proxy on {server.endpoint_url}"):
        pid = server.start(tuple(bucket or ["lake"]))
    console.print(f"S3Proxy running (pid {pid}) on {server.endpoint_url}, buckets in memory, log {server.log_file}")
    console.print("point the lake at it with:")
    for name, value in server.client_env().items():
        print(f"export {name}={value}")
    print(f"export LAKEHOUSE_LAKE_ROOT=s3a://{(bucket or ['lake'])[0]}/lake")


@s3_app.command("stop")
def s3_stop(port: Annotated[int, S3_PORT] = 9000) -> None:
    """Stop the local S3 server on this port (its buckets, kept in memory, are gone)."""
    from pipeline.s3server import LocalS3Server

    stopped = LocalS3Server.from_env(settings().home, port).stop()
    console.print("S3Proxy stopped" if stopped else "S3Proxy was not running")


FLEET_PANEL = "Synthetic fleet (with --synthetic)"


@app.command()
def produce(
    path: Annotated[Path | None, typer.Argument(help="NDJSON file, one message per line; '-' for stdin")] = None,
    synthetic: Annotated[bool, typer.Option(help="send a generated device fleet instead of a file")] = False,
    rate: Annotated[float, typer.Option(help="messages per second; 0 sends as fast as possible")] = 0.0,
    devices: Annotated[int, typer.Option(help="number of devices", rich_help_panel=FLEET_PANEL)] = 20,
    kinds: Annotated[
        str, typer.Option(help="device kinds, comma-separated: ids are pump-0000, ...", rich_help_panel=FLEET_PANEL)
    ] = "pump,valve,meter,sensor",
    messages: Annotated[int, typer.Option(help="number of messages", rich_help_panel=FLEET_PANEL)] = 2000,
    metrics: Annotated[
        int,
        typer.Option(
            help="named metrics (pressure_bar, flow_m3h, temperature_c, battery_pct, ..., then metric_19, ...), "
            "some devices sending only some; 0 sends `value` alone",
            rich_help_panel=FLEET_PANEL,
        ),
    ] = 0,
    batch_share: Annotated[
        float, typer.Option(help="share of messages that are batches", rich_help_panel=FLEET_PANEL)
    ] = 0.1,
    full_batches: Annotated[
        int, typer.Option(help="batches filled up to the message size limit", rich_help_panel=FLEET_PANEL)
    ] = 1,
    in_order: Annotated[
        bool,
        typer.Option(
            help="each device's readings in time order, dated just before they are sent, as real devices send "
            "(otherwise at random in the span, so that many arrive late)",
            rich_help_panel=FLEET_PANEL,
        ),
    ] = False,
    bad_share: Annotated[
        float,
        typer.Option(
            help="share of readings sent broken, for the quarantine: a bad metric name or value, both `value` and "
            "`metrics`, no timestamp, a message cut short",
            rich_help_panel=FLEET_PANEL,
        ),
    ] = 0.0,
    span_seconds: Annotated[
        int, typer.Option(help="readings spread over this many seconds", rich_help_panel=FLEET_PANEL)
    ] = 600,
    start: Annotated[
        str, typer.Option(help="time of the first reading", rich_help_panel=FLEET_PANEL)
    ] = "2024-07-30T12:00:00Z",
    seed: Annotated[int, typer.Option(help="random seed", rich_help_panel=FLEET_PANEL)] = 7,
    save: Annotated[
        Path | None, typer.Option(help="also write the messages to this NDJSON file", rich_help_panel=FLEET_PANEL)
    ] = None,
) -> None:
    """Send NDJSON lines (or a synthetic fleet) to the topic, keyed by device_id."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from lake.timestamps import from_us, parse_timestamp_us
    from pipeline.kafka.produce import produce as send
    from pipeline.kafka.synthetic import Fleet, generate

    current = settings()
    if synthetic == (path is not None):
        _fail("give either a PATH (or '-') or --synthetic")
    total: int | None = None  # bytes to send, for the progress bar, when known
    resources = ExitStack()
    if synthetic:
        try:
            fleet = Fleet(
                devices=devices,
                messages=messages,
                batch_share=batch_share,
                full_batches=full_batches,
                max_message_bytes=current.max_message_bytes,
                start=from_us(parse_timestamp_us(start)),
                span_seconds=span_seconds,
                seed=seed,
                metrics=metrics,
                max_metrics_per_reading=current.max_metrics_per_reading,
                in_order=in_order,
                bad_share=bad_share,
                kinds=tuple(kind.strip() for kind in kinds.split(",")),
            )
        except ValueError as exc:
            _fail(str(exc))
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
    with resources, Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("produce", total=total)
        report = send(current, source, on_progress=lambda n: progress.advance(task, n), rate=rate)
    blank = f"; {report.blank_lines} blank lines ignored" if report.blank_lines else ""
    console.print(f"sent {report.sent:,} messages ({report.bytes:,} bytes) to {current.topic!r}{blank}")
    report.raise_for_problems(current.max_message_bytes)


@app.command()
def pipeline(
    available_now: Annotated[bool, typer.Option("--available-now", help="process what Kafka holds, then exit")] = False,
    report: Annotated[
        Path | None,
        typer.Option(help="append one JSON line per micro-batch (counts, seconds per stage) to this file"),
    ] = None,
) -> None:
    """Run the streaming job Kafka -> bronze/silver/gold/quarantine (continuous unless --available-now)."""
    from pipeline.errors import StreamStopped
    from pipeline.stream.job import run

    try:
        reports = run(settings(), available_now=available_now, report_file=report)
    except StreamStopped:
        # The tasks cancelled with the query may still be logging as they end: Spark is stopped first, so that the
        # error below is the command's last word.
        from pyspark.sql import SparkSession

        session = SparkSession.getActiveSession()
        if session is not None:
            with suppress(Exception):  # the error that stopped the query is the one to tell
                session.stop()
        raise
    records = sum(r.records for r in reports)
    readings = sum(r.readings for r in reports)
    quarantined = sum(r.quarantined for r in reports)
    console.print(
        f"{len(reports)} micro-batches: {records:,} records, {readings:,} readings, {quarantined:,} quarantined"
    )


@app.command()
def audit(
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    kafka: Annotated[bool, typer.Option(help="also ask Kafka for each partition's offsets")] = True,
) -> None:
    """Account for every Kafka record and check that nothing was lost; exits 1 when a check fails.

    Per partition: records in Kafka and bronze, readings accepted and quarantined, offsets missing from bronze,
    offsets of transaction markers and aborted records (not missing: no reader sees them), and records removed by
    retention. Each bronze record is re-read with the current rules: each valid reading must be
    in silver, each invalid one in quarantine."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table as RichTable

    from pipeline.ops.audit import audit as run_audit

    columns = (TextColumn("re-reading bronze"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=as_json) as progress:
        task = progress.add_task("audit", total=None)
        report = run_audit(settings(), lambda done, total: progress.update(task, completed=done, total=total), kafka)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        raise typer.Exit(0 if report.ok else 1)
    out = Console()
    counts = RichTable(
        "topic",
        "part.",
        "Kafka offsets",
        "bronze",
        "to ingest",
        "readings",
        "accepted",
        "quar. readings",
        "quar. messages",
        "lost offsets",
        "missing",
        "removed by retention",
        title="accounting per partition",
    )
    for p in report.partitions:
        kafka_range = "?" if p.kafka_end_offset is None else f"{p.kafka_first_offset:,}..{p.kafka_end_offset - 1:,}"
        counts.add_row(
            p.topic,
            str(p.partition),
            kafka_range,
            f"{p.bronze_records:,}",
            "?" if p.not_yet_ingested is None else f"{p.not_yet_ingested:,}",
            f"{p.readings_in_messages:,}",
            f"{p.readings_accepted:,}",
            f"{p.readings_quarantined:,}",
            f"{p.messages_quarantined:,}",
            f"{p.offsets_lost:,}",
            f"{p.missing_from_bronze:,}",
            _retention_cell(p.removed_by_retention, p.retention_through_offset, p.quarantine_removed_by_retention),
        )
    totals = report.totals()
    counts.add_row(
        "total",
        "",
        "",
        f"{totals['bronze_records']:,}",
        "",
        f"{totals['readings_in_messages']:,}",
        f"{totals['readings_accepted']:,}",
        f"{totals['readings_quarantined']:,}",
        f"{totals['messages_quarantined']:,}",
        f"{totals['offsets_lost']:,}",
        f"{totals['missing_from_bronze']:,}",
        _retention_cell(totals["removed_by_retention"], None, totals["quarantine_removed_by_retention"]),
        style="bold",
    )
    out.print(counts)
    if totals["transaction_markers"] or totals["aborted_records"]:
        out.print(
            f"transactions: {totals['transaction_markers']:,} offsets hold commit or abort markers and "
            f"{totals['aborted_records']:,} aborted records; no reader sees them, and none is missing"
        )
    if report.kafka_error:
        console.print(f"[yellow]Kafka:[/] {escape(report.kafka_error)}")
    checks = RichTable("check", "result", title="checks")
    for check in report.checks:
        checks.add_row(check.name, "[green]ok[/]" if check.ok else f"[red]FAIL[/] {escape(check.detail)}")
    out.print(checks)
    if not report.ok:
        raise typer.Exit(1)


def _retention_cell(bronze_records: int, through: int | None, quarantine_rows: int) -> str:
    """Bronze records (up to which offset) and quarantine rows that retention removed."""
    up_to = f" (..{through:,})" if through is not None else ""
    return f"{bronze_records:,}{up_to}, quar. {quarantine_rows:,}"


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
    reason: Annotated[str | None, typer.Option(help="only quarantine rows with this reason code")] = None,
    since: Annotated[str | None, typer.Option(help="only rows quarantined at or after this instant (ISO 8601)")] = None,
) -> None:
    """Re-evaluate quarantined rows with the current rules; now-valid readings move into silver, gold and the rollups.

    For example after adding --extra-timestamp-format. Each now-valid reading moves exactly once; the rest keep an
    updated reason. Safe to run again, or while the pipeline runs (not on S3, where one Spark process writes a table
    at a time: stop the pipeline first)."""
    from lake.timestamps import TimestampError, from_us, parse_timestamp_us
    from pipeline.ops.replay import replay as run_replay

    current = settings()
    try:
        since_at = None if since is None else from_us(parse_timestamp_us(since))
    except TimestampError as exc:
        _fail(f"--since: {exc}")
    try:
        with console.status("replaying quarantine with the current rules"):
            report = run_replay(current, reason, since_at)
    except ValueError as exc:  # an unknown reason code
        _fail(str(exc))
    if report.missing:
        console.print(f"[yellow]warning:[/] {escape(report.missing_message())}")
    console.print(
        f"replayed {report.quarantined_rows - report.missing_rows:,} quarantine rows from {report.records:,} Kafka "
        "records: "
        f"{report.readings_accepted:,} readings now valid (merged into silver, gold and the rollups), "
        f"{report.still_invalid:,} rows still quarantined ({report.reasons_changed:,} with a new reason)"
    )


@app.command()
def maintain(
    table: Annotated[
        list[str] | None, typer.Option(help="only this table (repeatable): bronze|silver|gold|quarantine")
    ] = None,
    retain_hours: Annotated[
        float, typer.Option(help="VACUUM keeps files younger than this (whole hours); under 168 needs care")
    ] = 168,
    vacuum: Annotated[
        bool, typer.Option(help="delete files no longer in the table and older than --retain-hours")
    ] = True,
    unsafe_retention: Annotated[
        bool, typer.Option(help="allow --retain-hours under 1; only when no pipeline or other writer is running")
    ] = False,
) -> None:
    """Delete bronze and quarantine rows past their retention, compact small files, write Delta checkpoints and
    VACUUM; safe while the pipeline runs (not on S3).

    Retention follows LAKEHOUSE_BRONZE_RETENTION and LAKEHOUSE_QUARANTINE_RETENTION (forever by default); bronze is
    append-only again when a run ends, and a run that was interrupted is finished first. Runs on delta-rs, without
    Spark: seconds for a small lake. On S3, stop the pipeline first: Spark's S3 log store
    and delta-rs do not coordinate their commits."""
    from rich.table import Table as RichTable

    from lake.maintenance import UnsafeRetention, check_retention
    from lake.maintenance import maintain as run_maintenance
    from lake.tables import LakePaths, Table

    current = settings()
    try:
        chosen = [Table(name) for name in table] if table else None
    except ValueError as exc:
        _fail(str(exc))
    try:
        check_retention(retain_hours, unsafe_retention)
    except UnsafeRetention as exc:
        _fail(str(exc))
    if retain_hours < 168:
        console.print(
            f"[yellow]warning:[/] --retain-hours {retain_hours:g} is under 168: a reader on an older "
            "table version, or time travel to one, may fail"
        )
    row_retention = {t: current.retention(t.value) for t in (Table.BRONZE, Table.QUARANTINE)}
    with console.status("maintaining the lake") as status:

        def show(step: str) -> None:
            status.update(step)
            console.log(step)

        reports = run_maintenance(
            LakePaths.from_settings(current), chosen, retain_hours, vacuum, unsafe_retention, row_retention, show
        )
    summary = RichTable(
        "table",
        "rows removed by retention",
        "live files before",
        "compacted",
        "live files after",
        "deleted from storage",
        "version",
    )
    for r in reports:
        removed = ""
        if Table(r.table) in row_retention:
            removed = f"{r.rows_removed:,}" if row_retention[Table(r.table)] else "0 (kept forever)"
            removed += " (interrupted run finished)" if r.retention_repaired else ""
        summary.add_row(
            r.table,
            removed,
            str(r.live_files_before),
            str(r.files_compacted),
            str(r.live_files_after),
            str(r.files_vacuumed),
            str(r.version),
        )
    Console().print(summary)


@app.command()
def bench(
    quick: Annotated[
        bool, typer.Option(help="a small smoke run (about two minutes) instead of the full sizes")
    ] = False,
    part: Annotated[
        list[str] | None, typer.Option(help="only this part (repeatable): ingest|freshness|lookups|serving")
    ] = None,
    folder: Annotated[Path, typer.Option(help="work folder (deleted and made again)")] = Path("data/bench"),
    port: Annotated[int, typer.Option(help="port of the benchmark's own Kafka broker (and the next one)")] = 19492,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures to this JSON file")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="also write the table to this file")] = None,
) -> None:
    """Measure ingest, freshness, lookups and serving at scale beside references measured in the same run.

    Prints figure, ours, reference, ratio, goal and whether it is met. Starts its own Kafka broker, pipeline and
    API in --folder; the serving part's lake is built once and kept under <home>/bench; see BENCHMARKS.md."""
    from rich.table import Table as RichTable

    from bench.run import PARTS, Plan, as_json, markdown, run

    chosen = part or list(PARTS)
    unknown = set(chosen) - set(PARTS)
    if unknown:
        _fail(f"unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    current = settings().model_copy(update={"kafka_bootstrap": f"localhost:{port}"})
    with console.status("benchmark") as status:

        def show(text: str) -> None:
            status.update(text)
            console.log(text)

        figures = run(current, Plan.quick() if quick else Plan(), chosen, folder.resolve(), show)
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


API_FLAGS = [flag for flag in SETTING_FLAGS.values() if flag.serve_flag is not None]


@app.command(cls=ServeCommand)
@_with_setting_flags(API_FLAGS, lambda flag: str(flag.serve_flag))
def serve(workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1, **api_flags: object) -> None:
    """Run the HTTP API and dashboard: GET /, /kpis, /kpis/{timestamp}, /kpis/{timestamp}/metrics, /catalog/metrics,
    /devices, /health, /metrics (Prometheus), OpenAPI at /schema."""
    import uvicorn

    _overrides.update(_given(api_flags))
    current = settings()
    from lake import objectstore

    if objectstore.is_s3(current.lake_root):  # one line now, not a stack trace from every worker
        objectstore.check_access(current.lake_root)
    # The app factory reads settings from the environment, also in worker processes.
    os.environ.update(current.as_env())
    # The app logs each request as a JSON line itself, so uvicorn's access log stays off.
    from serve.app import NoDelayHttp

    uvicorn.run(
        "serve.app:create_app",
        factory=True,
        http=NoDelayHttp,
        host=current.http_host,
        port=current.http_port,
        workers=workers,
        log_level="info",
        access_log=False,
    )


@app.command()
def sql(
    query: Annotated[str | None, typer.Argument(help="SQL to run; without it, an interactive prompt")] = None,
    output: Annotated[str, typer.Option(help="table|csv|json")] = "table",
    export_to: Annotated[
        Path | None,
        typer.Option("--export", help="write the four tables into this DuckDB database file (a snapshot) and exit"),
    ] = None,
) -> None:
    """DuckDB over the lake, with views bronze, silver, gold, rollups, quarantine and metrics."""
    import duckdb

    from lake.duck import connect
    from lake.sql import export, interactive, run_query
    from lake.tables import LakePaths

    connection = connect(LakePaths.from_settings(settings()))
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
    except (duckdb.Error, ValueError) as exc:  # DuckDB's own message says what is wrong with the query
        _fail(str(exc))


if __name__ == "__main__":
    app(prog_name="lakehouse")
