"""The `annotate` command: parse arguments, call one library function, map the outcome to
an exit code. No logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import typing
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from . import config, export, report, runner
from .config import SimulatorSettings
from .cost import estimate
from .errors import ConfigError, Interrupted, ManifestError, RequestFailed, RunStopped, StoreError
from .manifest import ids_of_last_run
from .engines import batch
from .store import compact
from .store.folder import open_folder
from .store.parts import parts, read_run_info

T = TypeVar("T")

__all__ = ["main", "simulator_arguments", "simulator_settings", "EXIT_OK", "EXIT_ROWS_FAILED", "EXIT_BAD_INPUT",
           "EXIT_BUDGET", "EXIT_INTERRUPTED"]

EXIT_OK = 0  # every row answered
EXIT_ROWS_FAILED = 1  # the run finished but some rows failed (they are in the output with their error)
EXIT_BAD_INPUT = 2  # bad config, arguments or manifest: nothing was sent
EXIT_BUDGET = 3  # stopped at limits.max_cost_usd: resumable once it is raised
EXIT_INTERRUPTED = 130  # interrupted: what was received is on disk

_EPILOG = """exit codes:
  0    every row answered
  1    the run finished but some rows failed (they are in the output with their error),
       or it stopped because every request failed alike (wrong key, account or model)
  2    bad config, bad arguments or unreadable manifest, or an output directory in use
       or written with another config (nothing was sent)
  3    stopped at the budget, limits.max_cost_usd (raise it and run again to go on)
  130  interrupted (what was received is on disk; run the same command to resume)
"""


def _summary_text(s: runner.Summary) -> str:
    cost = f"${s.cost_usd:.4f}" + ("" if s.priced else " (some rows had no known price)")
    failing = f"{s.failed} now" + (f" + {s.failed_before} from earlier runs (--retry-failed asks those again)"
                                   if s.failed_before else "")
    lines = [
        f"annotate: finished in {s.elapsed_s:.1f} s; {s.total} rows in the manifest",
        f"  answered now: {s.ok + s.failed} ({s.ok} ok, {s.failed} failed; {s.retried} had failed before)",
        *([f"  flagged rows asked again: {s.flagged}"
           + (f" ({s.kept_earlier} failed and keep their earlier answer)" if s.kept_earlier else "")]
          if s.flagged else []),
        f"  resumed: {s.resumed} answered by earlier runs",
        f"  still failing: {failing}",
        *(f"    {n} on {kind}" for kind, n in sorted(s.errors.items())),
        *([f"  pace: {s.held}; it was kept below the configured limit (last seen)"] if s.held else []),
        f"  tokens now: {s.prompt_tokens} prompt + {s.completion_tokens} completion; cost of this run: {cost}",
        *([f"  budget: ${s.spent_usd:.4f} spent of ${s.budget_usd:g} (earlier runs included)"
           + ("; stopped there: raise limits.max_cost_usd and run again to go on" if s.stopped_at_budget else "")]
          if s.budget_usd is not None else []),
        f"  output: {str(s.output_dir).rstrip('/')}/  (read it with pl.scan_parquet('{str(s.output_dir).rstrip('/')}/*.parquet'))",
    ]
    return "\n".join(lines)


def _in_loop(job: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=runner.new_event_loop) as loop:
        return loop.run(job)


def _run(args: argparse.Namespace) -> int:
    engine = [f"engine={args.engine}"] if args.engine else []
    no_wait = ["batch.wait=false"] if args.no_wait else []
    cfg = config.load(args.config, overrides=[*args.set, *engine, *no_wait], output_dir=args.output)
    summary = _in_loop(runner.run(cfg, limit=args.limit, progress=not args.quiet,
                                  retry_failed=args.retry_failed, retry_flagged=args.retry_flagged,
                                  force=args.force))
    print(_summary_text(summary))
    if summary.stopped_at_budget:
        return EXIT_BUDGET
    return EXIT_OK if summary.failed == summary.failed_before == 0 else EXIT_ROWS_FAILED


def _estimate_text(e: dict[str, Any]) -> str:
    def usd(value: float | None) -> str:
        return "no price known" if value is None else f"${value:.4f}"

    tokens_in, tokens_out, cost = e["input_tokens"], e["output_tokens"], e["cost_usd"]
    basis = (f"from {e['sampled_rows']} sampled rows" if e["sampled_rows"]
             else "half of max_tokens; --sample N measures it")
    lines = [
        f"annotate estimate: {e['rows']} rows, {e['images']} images, {e['model']} (detail {e['detail']})",
        f"  input tokens: {tokens_in['total']} expected ({tokens_in['image']} image + {tokens_in['text']} text), "
        f"{tokens_in['low']} to {tokens_in['max']}",
        f"  output tokens: {tokens_out['expected']} expected ({basis}), at most {tokens_out['max']}",
        f"  cost: low {usd(cost['low'])}, expected {usd(cost['expected'])}, high {usd(cost['high'])}"
        + (f" at the Batch API's price (online: {usd(e['online_expected_usd'])} expected)"
           if e["engine"] == "batch" else ""),
        f"  text tokens {e['text_tokens_note']}",
        *(["  detail 'auto' is estimated as 'high'; the low end assumes the model picks 'low'"]
          if e["detail_auto_as_high"] else []),
        *([f"  {e['unreadable_rows']} rows have images that cannot be read and are not counted"]
          if e["unreadable_rows"] else []),
    ]
    return "\n".join(lines)


def _estimate(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, overrides=[*args.set, *([f"engine={args.engine}"] if args.engine else [])])
    sampled = None
    if args.sample:
        _in_loop(runner.run(cfg, limit=args.sample, progress=False))
        sampled = cfg.output.dir  # the sampled answers stay there: a later run does not pay again
    result = estimate.estimate(cfg, sampled)
    print(json.dumps(result, indent=2) if args.json else _estimate_text(result))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    result = report.summarize(args.dir)
    print(json.dumps(result, indent=2) if args.json else report.render(result))
    return EXIT_OK


def _compact(args: argparse.Namespace) -> int:
    info = read_run_info(open_folder(args.dir))
    journal_dir = ((info or {}).get("config") or {}).get("output", {}).get("journal_dir")
    done = compact.compact(args.dir, ids_of_last_run(info), journal_dir=Path(journal_dir) if journal_dir else None)
    order = "in manifest order" if done.in_manifest_order else "in their earlier order (manifest not readable)"
    print(f"annotate: {args.dir}: {done.rows} rows, {done.parts_before} parts -> {done.parts_after}, {order}")
    return EXIT_OK


def _view(args: argparse.Namespace) -> int:
    from .view import app  # starlette and uvicorn load only for this command

    folder = open_folder(args.dir)
    if read_run_info(folder) is None and not parts(folder):  # exit 2 before the server starts
        raise StoreError(f"{args.dir}: not an output directory (no _run.json and no parts)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"annotate: listening on {args.host}: anyone who can reach it sees the rows and images of "
              f"{args.dir}", file=sys.stderr)
    try:
        app.serve(args.dir, args.host, args.port)
    except OSError as exc:
        raise ConfigError(f"--port {args.port}: cannot listen on {args.host} ({exc.strerror})") from None
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    done = export.export(args.dir, args.to, args.format, args.where, args.images, progress=not args.quiet)
    left = f"; {len(done.skipped)} left out, their image unreadable now" if done.skipped else ""
    print(f"annotate: {done.rows} of {done.selected} selected rows exported to {args.to} ({args.format}){left}")
    return EXIT_OK


def _batch(args: argparse.Namespace) -> int:
    try:
        return _batch_command(args)
    except RequestFailed as exc:
        raise RunStopped(f"{args.dir}: the Batch API: {exc}") from None


def _batch_command(args: argparse.Namespace) -> int:
    if args.batch_command == "status":
        lines = _in_loop(batch.status(args.dir))
        print("\n".join(map(str, lines)) if lines else f"annotate: {args.dir}: no batches")
        return EXIT_OK
    cfg = batch.last_run_config(args.dir)
    cfg = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"wait": True})})  # a --no-wait run's too
    cancelled = _in_loop(batch.cancel(args.dir))
    print(f"annotate: {args.dir}: asked to cancel {len(cancelled)} batches "
          f"({', '.join(cancelled) or 'none under way'}); collecting what they finished")
    summary = _in_loop(runner.run(cfg, limit=0, progress=False))  # no new rows: only what the batches hold
    print(_summary_text(summary))
    return EXIT_OK


def _scalar(annotation: Any) -> type:
    """int or float out of an annotation like `Annotated[int, Gt(0)] | None`; else str, which pydantic parses."""
    while (args := typing.get_args(annotation)) and typing.get_origin(annotation) is not None:
        annotation = next(a for a in args if a is not type(None))
    return annotation if annotation in (int, float) else str


def simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per SimulatorSettings field; an absent flag keeps the field's default."""
    for name, info in SimulatorSettings.model_fields.items():
        kind = _scalar(info.annotation)
        default = "none" if info.default is None else info.default
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=kind.__name__.upper(),
                            type=kind,
                            help=f"{info.description or name.replace('_', ' ')} (default: {default})")


def simulator_settings(args: argparse.Namespace) -> SimulatorSettings:
    values = {name: getattr(args, name) for name in SimulatorSettings.model_fields
              if getattr(args, name, None) is not None}
    try:
        return SimulatorSettings(**values)
    except ValidationError as exc:
        raise ConfigError(f"simulate: {config.one_line(exc)}") from None


def _simulate(args: argparse.Namespace) -> int:
    from .simulator import (
        server as simulator,  # the server's libraries load only for this command
    )

    settings = simulator_settings(args)
    print(f"annotate: simulator on http://{args.host}:{args.port}/v1 (Ctrl-C stops it)", file=sys.stderr)
    simulator.serve(settings, host=args.host, port=args.port)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="annotate", description="Batch image annotation with OpenAI-compatible vision models.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each request, retry and warning")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run, or resume, the job", epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", type=Path)
    run.add_argument("-o", "--output", help="output directory or bucket URL (overrides output.dir)")
    run.add_argument("--limit", type=int, help="answer at most N more rows")
    run.add_argument("--engine", choices=["local", "ray", "batch"],
                     help="run in this process (local), on a Ray cluster (ray) or through the provider's Batch API "
                          "(batch); overrides engine:")
    run.add_argument("--no-wait", action="store_true",
                     help="engine batch: submit the batches and exit; a later run collects them")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config key; the value is read as YAML (repeatable)")
    run.add_argument("--retry-failed", action="store_true",
                     help="ask again rows that failed for good (4xx, bad image); transient failures always are")
    run.add_argument("--retry-flagged", action="store_true",
                     help="ask again only the answered rows flagged for a second look (empty, cut at max_tokens, "
                          "refusal, short, duplicate), with quality.retry over the request; each row keeps "
                          "what its earlier answers cost")
    run.add_argument("--force", action="store_true",
                     help="resume although the config's model, prompt or parameters changed since the last run")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=_run)

    est = commands.add_parser("estimate", help="rows, tokens and cost expected, before any request is sent")
    est.add_argument("config", type=Path)
    est.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    est.add_argument("--sample", type=int, metavar="N",
                     help="first answer N rows for real (into output.dir) and scale the estimate by their usage")
    est.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config key")
    est.add_argument("--engine", choices=["local", "ray", "batch"],
                     help="price for this engine (batch: the Batch API's price); overrides engine:")
    est.set_defaults(handler=_estimate)

    rep = commands.add_parser("report", help="what a run produced: rows by status, tokens, cost, latency")
    rep.add_argument("dir", type=config.as_location)
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(handler=_report)

    com = commands.add_parser("compact", help="rewrite many small parts into a few large ones, one row per id")
    com.add_argument("dir", type=config.as_location)
    com.set_defaults(handler=_compact)

    exp = commands.add_parser("export", help="the rows of an output directory in a format trainers read")
    exp.add_argument("dir", type=config.as_location)
    exp.add_argument("--to", type=Path, required=True, help="a new file (jsonl) or folder (the others)")
    exp.add_argument("--format", choices=export.FORMATS, required=True,
                     help="jsonl: a row a line; sidecar: ID.jpg + ID.txt; webdataset: tar shards; hf: a datasets dataset")
    exp.add_argument("--where", default=export.DEFAULT_WHERE,
                     help=f"which rows: a SQL condition over the output's columns (default: {export.DEFAULT_WHERE})")
    exp.add_argument("--images", choices=["sent", "original"], default="sent",
                     help="the images as they were sent (converted, downscaled) or the files as they are")
    exp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    exp.set_defaults(handler=_export)

    view = commands.add_parser("view", help="a local web page over an output directory: images beside their "
                                            "answers, filters, sorting, each row whole")
    view.add_argument("dir", type=config.as_location)
    view.add_argument("--port", type=int, default=8765, help="default 8765; 0 picks a free one")
    view.add_argument("--host", default="127.0.0.1",
                      help="the address to listen on; default 127.0.0.1, this machine only")
    view.set_defaults(handler=_view)

    bat = commands.add_parser("batch", help="the Batch API batches of an output directory (engine: batch)")
    bat_commands = bat.add_subparsers(dest="batch_command", required=True)
    for name, words in (("status", "list them: id, status, counts, age, expiry"),
                        ("cancel", "cancel those under way and collect what they finished")):
        one = bat_commands.add_parser(name, help=words)
        one.add_argument("dir", type=config.as_location)
        one.set_defaults(handler=_batch)

    sim = commands.add_parser("simulate", help="the bundled OpenAI-compatible simulator, on loopback")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    simulator_arguments(sim)
    sim.set_defaults(handler=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="annotate: %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (ConfigError, ManifestError, StoreError) as exc:
        print(f"annotate: {exc}", file=sys.stderr)  # one line naming the field or file
        return EXIT_BAD_INPUT
    except RunStopped as exc:
        print(f"annotate: stopped: {exc}", file=sys.stderr)
        return EXIT_ROWS_FAILED
    except Interrupted as exc:
        print(f"annotate: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before the run's own handlers are in place
        return EXIT_INTERRUPTED
