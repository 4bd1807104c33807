"""The ``stream-kpis`` command line.

Commands: ``replay`` (files through the core), ``cohorts`` (the retention triangle of a replay),
``generate`` (synthetic events), ``demo`` (the live pipeline on a local broker), ``worker``,
``topics create``, ``produce``, ``tail``, ``alerts render``, ``dashboard render``.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson

from .core.timebase import parse_duration
from .exceptions import StreamKpisError
from .runtime import tune_gc
from .settings import load_settings

__all__ = ["main", "cli", "CohortRow", "cohort_csv", "cohort_triangle"]


class _Duration(click.ParamType):
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = _Duration()


def _format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _labels_text(record: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in record.get("labels", {}).items())


def print_kpi_table(records: Iterable[dict[str, Any]], title: str, console: Any = None) -> None:
    """Readable tables of KPI records, one per output topic."""
    from rich.console import Console
    from rich.table import Table

    from .core.kpis import KPI_TOPICS

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    console.print(f"[bold]{title}[/bold]")
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_topic.setdefault(KPI_TOPICS[record["kpi"]], []).append(record)
    for topic, rows in by_topic.items():
        table = Table(title=f"loyalty.kpi.{topic}", title_justify="left")
        for column in ("kpi", "window", "labels"):
            table.add_column(column)
        for column in ("value", "numerator", "denominator"):
            table.add_column(column, justify="right")
        for record in rows:
            table.add_row(record["kpi"], record["window"] or "", _labels_text(record),
                          _format_value(record["value"]), _format_value(record["numerator"]),
                          _format_value(record["denominator"]))
        console.print(table)


def _sources(files: tuple[Path, ...], config_path: Path | None) -> list:
    """The files named on the command line plus the config's [[replay.sources]]."""
    from .replay import load_sources, source_for_path

    sources = [source_for_path(path) for path in files]
    if config_path is not None:
        sources += load_sources(config_path)
    if not sources:
        raise click.UsageError("name at least one FILE, or a --config with [[replay.sources]]")
    return sources


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stream-kpis")
def cli() -> None:
    """Exact loyalty-program KPIs from Kafka event streams (and from files)."""
    tune_gc()  # every command but the shortest processes events: see stream_kpis/runtime.py


@cli.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML with [kpis] settings and [[replay.sources]] file mappings.")
@click.option("--output", type=click.Choice(["table", "jsonl"]), default="table", show_default=True,
              help="table: readable; jsonl: one SPEC record per line on stdout.")
@click.option("--every", type=DURATION, default=None,
              help="Also emit the KPIs each time event time passes a multiple of this (e.g. 1d).")
@click.option("--dead-letters", type=click.Path(dir_okay=False, path_type=Path),
              help="Write bad lines here (JSONL: reason, detail, topic=the file, offset=the line, original).")
@click.option("--signals", "signals_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write member signals (at_risk, churned, reactivated, points_expiring) here.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
def replay(files: tuple[Path, ...], config_path: Path | None, output: str, every: int | None,
           dead_letters: Path | None, signals_path: Path | None, progress: bool | None) -> None:
    """Replay event files through the KPI core and print the KPIs as of the last event.

    FILES are JSON Lines (one event per line with a "type" field) or CSV with our column names;
    "-" reads JSON Lines from standard input. Mapped CSV exports are listed in the config's
    [[replay.sources]].
    """
    settings = load_settings(config_path)
    sources = _sources(files, config_path)
    out = sys.stdout.buffer
    closers = []

    def writer(path: Path | None):
        if path is None:
            return None
        handle = open(path, "wb")  # noqa: SIM115 (closed at the end)
        closers.append(handle)
        return handle

    dead_file, signal_file = writer(dead_letters), writer(signals_path)

    def on_dead_letter(dead: Any) -> None:
        if dead_file is not None:
            dead_file.write(orjson.dumps(dead.to_record()) + b"\n")

    def on_signal(signal: dict) -> None:
        signal_file.write(orjson.dumps(signal) + b"\n")

    def on_series(records: list[dict]) -> None:
        if output == "jsonl":
            out.write(b"".join(orjson.dumps(r) + b"\n" for r in records))

    try:
        result = _replay_with_progress(sources, settings, progress, every_ms=every,
                                       on_dead_letter=on_dead_letter,
                                       on_signal=on_signal if signal_file else None,
                                       on_series=on_series)
    finally:
        for handle in closers:
            handle.close()
    if output == "jsonl":
        out.write(b"".join(orjson.dumps(r) + b"\n" for r in result.records))
        out.flush()
    else:
        print_kpi_table(result.records, f"KPIs as of {_as_of_text(result, settings)}")
    _echo_summary(result)


def _replay_with_progress(sources: list, settings: Any, progress: bool | None, **options: Any):
    """``replay.replay`` with a progress bar on stderr (by default when stderr is a terminal
    and no source is standard input, whose size is unknown)."""
    from .replay import replay as run_replay

    total = sum(s.path.stat().st_size for s in sources if not s.is_stdin and s.path.exists())
    reads_stdin = any(s.is_stdin for s in sources)
    show_progress = sys.stderr.isatty() and not reads_stdin if progress is None else progress
    if not show_progress:
        return run_replay(sources, settings, **options)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(),
                  "[progress.percentage]{task.percentage:>3.0f}%", TransferSpeedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("replay", total=total)
        return run_replay(sources, settings, **options,
                          on_bytes=lambda n: bar.update(task, advance=0, completed=n))


def _as_of_text(result: Any, settings: Any) -> str:
    from .core.timebase import as_of_time

    if result.as_of_bucket is None:
        return "no events"
    return as_of_time(result.as_of_bucket, settings.bucket_ms)


def _echo_summary(result: Any) -> None:
    """The replay's counts, on stderr."""
    bad = sum(result.dead_letters.values())
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(result.dead_letters.items()))
    click.echo(f"applied {result.applied} events, {result.duplicates} duplicates, "
               f"{bad} dead letters{f' ({reasons})' if bad else ''}, {result.signals} member signals",
               err=True)


@dataclass(frozen=True)
class CohortRow:
    """One row of the retention triangle: an enrollment month, its members, and per age
    0, 1, ... the ``cohort_retention`` value (None where the ratio is null)."""

    cohort: str
    members: int
    retention: tuple[float | None, ...]


def cohort_triangle(records: Iterable[dict[str, Any]]) -> list[CohortRow]:
    """The ``cohort_size`` and ``cohort_retention`` records (SPEC 4.3) as triangle rows, oldest
    cohort first; a row has one cell per age the core reported for it."""
    sizes: dict[str, int] = {}
    cells: dict[str, dict[int, float | None]] = {}
    for record in records:
        labels = record.get("labels") or {}
        if record["kpi"] == "cohort_size":
            sizes[labels["cohort"]] = record["value"]
        elif record["kpi"] == "cohort_retention":
            cells.setdefault(labels["cohort"], {})[int(labels["age"])] = record["value"]
    rows = []
    for cohort in sorted(sizes):
        ages = cells.get(cohort, {})
        rows.append(CohortRow(cohort, sizes[cohort], tuple(ages.get(a) for a in range(len(ages)))))
    return rows


def _percent(value: float | None, decimals: int) -> str:
    return "" if value is None else f"{100 * value:.{decimals}f}"


def print_cohort_table(rows: Sequence[CohortRow], title: str, console: Any = None) -> None:
    """The triangle as a table: retention in % of the cohort, one column per age."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    console.print(f"[bold]{title}[/bold]")
    ages = max((len(row.retention) for row in rows), default=0)
    table = Table()
    table.add_column("cohort")
    table.add_column("members", justify="right")
    for age in range(ages):
        table.add_column(f"age {age}", justify="right")
    for row in rows:
        cells = [_percent(value, 1) + ("%" if value is not None else "") for value in row.retention]
        table.add_row(row.cohort, f"{row.members:,}", *cells, *[""] * (ages - len(cells)))
    console.print(table)


def cohort_csv(rows: Sequence[CohortRow]) -> str:
    """The triangle as CSV: ``cohort,members,age_0,age_1,...``; retention in % of the cohort
    (2 decimals), empty for an age the cohort has not reached."""
    ages = max((len(row.retention) for row in rows), default=0)
    text = io.StringIO()
    out = csv.writer(text, lineterminator="\n")
    out.writerow(["cohort", "members", *(f"age_{age}" for age in range(ages))])
    for row in rows:
        cells = [_percent(value, 2) for value in row.retention]
        out.writerow([row.cohort, row.members, *cells, *[""] * (ages - len(cells))])
    return text.getvalue()


@cli.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML with [kpis] settings (cohorts, cohort_ages) and [[replay.sources]].")
@click.option("--output", type=click.Choice(["table", "csv"]), default="table", show_default=True,
              help="table: readable; csv: one row per cohort on stdout.")
@click.option("--cohorts", "cohorts", type=click.IntRange(min=1), default=None,
              help="Enrollment months to show, up to the month of the last event "
                   "(default: [kpis] cohorts, 12).")
@click.option("--ages", type=click.IntRange(min=1), default=None,
              help="Months after enrollment to show (default: [kpis] cohort_ages, 12).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
def cohorts(files: tuple[Path, ...], config_path: Path | None, output: str, cohorts: int | None,
            ages: int | None, progress: bool | None) -> None:
    """Replay event files and print the cohort retention triangle as of the last event.

    Rows are enrollment months (cohorts), columns the months after enrollment (age 0 is the
    month of enrollment); a cell is the share of the cohort's members with a purchase or
    redemption in that month (SPEC 4.3). FILES and --config as for ``replay``.
    """
    overrides: dict[str, Any] = {"segments": ()}  # the triangle needs no segment
    if cohorts is not None:
        overrides["cohorts"] = cohorts
    if ages is not None:
        overrides["cohort_ages"] = ages
    settings = load_settings(config_path).with_overrides(**overrides)
    if settings.cohorts == 0 or settings.cohort_ages == 0:
        raise click.UsageError("cohort retention is off ([kpis] cohorts or cohort_ages = 0): "
                               "pass --cohorts N --ages N")
    result = _replay_with_progress(_sources(files, config_path), settings, progress)
    rows = cohort_triangle(result.records)
    if output == "csv":
        click.echo(cohort_csv(rows), nl=False)
    else:
        print_cohort_table(rows, f"Cohort retention as of {_as_of_text(result, settings)}: % of "
                                 "each enrollment month's members active in month +age")
    _echo_summary(result)


@cli.command()
@click.option("--members", type=int, default=1000, show_default=True)
@click.option("--days", type=int, default=90, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--start", default=None, help="RFC 3339 start time (default 2024-01-01T00:00:00Z); "
                                            "'now' ends the stream at the current time.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output JSONL file (default stdout).")
def generate(members: int, days: int, seed: int, start: str | None, output: Path | None) -> None:
    """Write a seeded synthetic loyalty event stream (JSON Lines)."""
    from .core.timebase import parse_rfc3339_ms
    from .generate import GeneratorConfig, write_jsonl

    options: dict[str, Any] = {"members": members, "days": days, "seed": seed}
    if start == "now":
        import time

        options["start_ms"] = (int(time.time() * 1000) // 3_600_000 * 3_600_000) - days * 86_400_000
    elif start:
        options["start_ms"] = parse_rfc3339_ms(start)
    config = GeneratorConfig(**options)
    summary = write_jsonl(config, output if output is not None else sys.stdout.buffer)
    click.echo(f"generated {summary}", err=True)


def _settings(config_path: Path | None, **overrides: Any):
    return load_settings(config_path, **{k: v for k, v in overrides.items() if v is not None})


_config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                              envvar="STREAM_KPIS_CONFIG", help="TOML settings file.")


_targets_option = click.option("--targets", type=click.Path(dir_okay=False, path_type=Path),
                               default=Path("deploy/targets.toml"), show_default=True,
                               help="KPI targets (goals) file.")


def _output_option(help_text: str) -> Any:
    return click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
                        default=None, help=help_text)


def _write_or_echo(text: str, output: Path | None) -> None:
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


@cli.group()
def alerts() -> None:
    """KPI targets -> Prometheus alerting rules."""


@alerts.command("render")
@_targets_option
@_output_option("Rule file to write (default stdout).")
@_config_option
def alerts_render(targets: Path, output: Path | None, config_path: Path | None) -> None:
    """Render Prometheus alerting rules from a targets TOML file.

    With --config, a target on a window the workers do not compute is an error.
    """
    from .ops.alerts import render_to_yaml

    windows = load_settings(config_path).windows_ms if config_path is not None else None
    _write_or_echo(render_to_yaml(targets, known_windows=windows), output)


@cli.command()
@_config_option
@click.option("--loglevel", "-l", default="info", show_default=True)
def worker(config_path: Path | None, loglevel: str) -> None:
    """Run a worker (one member of the consumer group; start more to scale out)."""
    import os

    if config_path is not None:
        os.environ["STREAM_KPIS_CONFIG"] = str(config_path)
    settings = load_settings(config_path)
    from .live.kafka_tools import check_copartitioning

    check_copartitioning(settings)
    from faust import Worker

    from .app import app

    Worker(app, loglevel=loglevel).execute_from_commandline()


@cli.group()
def topics() -> None:
    """Kafka topics of stream-kpis."""


@topics.command("create")
@_config_option
@click.option("--partitions", type=int, default=None, help="Partitions of the input topics.")
@click.option("--replication", type=int, default=None,
              help="Replication factor (default: the replication setting, 1).")
def topics_create(config_path: Path | None, partitions: int | None, replication: int | None) -> None:
    """Create the input, DLQ, signal, KPI and changelog topics (existing topics are kept)."""
    from .live.kafka_tools import create_topics

    settings = _settings(config_path, partitions=partitions, replication=replication)
    created = create_topics(settings, settings.replication)
    click.echo(f"created {len(created)} topic(s){': ' + ', '.join(created) if created else ''}")


@cli.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_config_option
@click.option("--rate", type=float, default=0, help="Events per second (0: as fast as possible).")
def produce(files: tuple[Path, ...], config_path: Path | None, rate: float) -> None:
    """Send JSONL or CSV files (or the config's [[replay.sources]]) to the input topics."""
    from .live.kafka_tools import produce_sources

    settings = load_settings(config_path)
    sources = _sources(files, config_path)
    sent = produce_sources(sources, settings, rate)
    click.echo(f"produced {sent} events", err=True)


@cli.command()
@_config_option
@click.option("--signals/--no-signals", default=True, help="Include member signals.")
@click.option("--from-beginning", is_flag=True)
@click.option("--timeout", type=float, default=None, help="Stop after this many idle seconds.")
def tail(config_path: Path | None, signals: bool, from_beginning: bool, timeout: float | None) -> None:
    """Print KPI records and member signals as they are published."""
    from .live.kafka_tools import tail as tail_topics

    settings = load_settings(config_path)
    names = list(settings.topics.kpi_topics().values())
    if signals:
        names.append(settings.topics.signals)
    for _topic, record in tail_topics(settings, names, from_beginning, timeout):
        if "kpi" in record:
            labels = _labels_text(record)
            click.echo(f"{record['as_of']}  {record['kpi']:<26} {record['window'] or '':>4} "
                       f"{labels:<32} {_format_value(record['value'])}")
        else:
            click.echo(f"{record.get('as_of')}  signal {record.get('signal'):<16} "
                       f"last_touch={record.get('last_touch')}")


@cli.command()
@click.option("--members", type=int, default=3000, show_default=True)
@click.option("--days", type=int, default=120, show_default=True)
@click.option("--rate", type=float, default=3000, show_default=True, help="Events per second.")
@click.option("--keep-services", is_flag=True, help="Leave Kafka and Redis running at the end.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
def demo(members: int, days: int, rate: float, keep_services: bool, duration: float | None) -> None:
    """The live demo: local Kafka + Redis, a worker, a generated stream, KPIs updating live."""
    from .ops.demo import run_demo

    run_demo(members=members, days=days, rate=rate, keep_services=keep_services, duration=duration)


@cli.group()
def dashboard() -> None:
    """Grafana dashboard generated from the KPI targets."""


@dashboard.command("render")
@_targets_option
@_output_option("Dashboard JSON to write (default stdout).")
def dashboard_render(targets: Path, output: Path | None) -> None:
    """Render the Grafana dashboard JSON with the targets drawn as thresholds."""
    from .ops.dashboard import render_dashboard_json

    _write_or_echo(render_dashboard_json(targets), output)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors print one clear line and exit 2."""
    try:
        cli.main(args=argv, prog_name="stream-kpis", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except StreamKpisError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except BrokenPipeError:
        sys.exit(0)
