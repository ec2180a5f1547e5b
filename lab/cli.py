"""The `lab` command line: the console by default; inspect, run, runs, export, sweep, sweeps, heads, bench."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager

from lab.errors import LabError


def _model_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    if default is None:
        parser.add_argument("model", help="builtin name, random:<type>, local directory or hub id")
    else:
        parser.add_argument("--model", default=default, help="builtin name, random:<type>, directory or hub id")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, device_map (accelerate) or meta "
                                                         "(random:/config: specs, no memory)")
    parser.add_argument("--attn", dest="attn_implementation", default=None, metavar="IMPL",
                        help="attention implementation: eager, sdpa, ...")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code")
    parser.add_argument("--allow-pickle", action="store_true", help="allow non-safetensors weights")


def _spec(args):
    from lab.models import ModelSpec

    return ModelSpec(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation,
                     trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)


def cmd_inspect(args) -> int:
    from lab.models import load
    from lab.report import anatomy_table

    loaded = load(_spec(args))
    if args.json:
        print(json.dumps(loaded.anatomy.to_json(), indent=1 if args.pretty else None))
    else:
        _stdout().print(anatomy_table(loaded))
    return 0


PIPED_WIDTH = 100_000  # piped output: wide enough that no table folds a cell or a title
MIN_WIDTH = 40  # a narrower terminal (or $COLUMNS) is printed as if it had this width


def _stdout():
    """A rich console on stdout: the terminal's width (or $COLUMNS, if set), or, piped, so wide that tables
    keep whole paths and names on one line (for grep and friends)."""
    from rich.console import Console

    if not (sys.stdout.isatty() or os.environ.get("COLUMNS")):
        return Console(width=PIPED_WIDTH)
    console = Console()
    if console.width < MIN_WIDTH:  # rich's tables fail below a few columns ($COLUMNS=5), print nothing at 0
        console = Console(width=MIN_WIDTH)
    return console


def _store(args, readonly: bool = False):
    from lab.store import Store

    if args.db is not None and not args.db.strip():
        raise LabError("--db is empty: give the results database's path (or leave --db out for the default)")
    return Store(args.db, readonly=readonly)


def _preset(args):
    """The preset of `lab run` / `lab sweep`, on --model if given; remote code and pickles only from this
    command line's flags, never from the preset."""
    from lab import presets

    preset = presets.load(args.preset)
    return preset.with_model(args.model or preset.model.name, trust_remote_code=args.trust_remote_code,
                             allow_pickle=args.allow_pickle)


def _drive(events, quiet: bool):
    """Consume a run's events, with a progress bar per probe (in its own units) on a terminal; return its
    Finished event."""
    from rich.markup import escape

    from lab.report import progress_bar, unit
    from lab.runner import Finished, Progress, Started

    bar = None if quiet or not sys.stderr.isatty() else progress_bar()
    final, tasks = None, {}
    try:
        for event in events:
            if isinstance(event, Started):
                counts = {probe: (done, total, unit(probe)) for probe, (done, total) in event.probes.items()}
                if bar is not None:
                    bar.start()
                    tasks = {probe: bar.add_task(escape(probe), total=total, completed=done, unit=units)
                             for probe, (done, total, units) in counts.items()}
                elif not quiet:
                    done = ", ".join(f"{probe} {n}/{total} {units}" for probe, (n, total, units) in counts.items())
                    print(f"run {event.run_id}: {event.plan}; {done} already done", file=sys.stderr)
            elif isinstance(event, Progress) and bar is not None:
                bar.advance(tasks[event.probe], len(event.rows))
            elif isinstance(event, Finished):
                final = event
    finally:
        if bar is not None:
            bar.stop()
    return final


def cmd_run(args) -> int:
    from lab.report import summary_tables
    from lab.session import Session

    preset = _preset(args)
    store = _store(args)
    session = Session.open(preset.model)
    with session.claim("a probe run") as job:
        final = _drive(session.run(preset, store, job), args.json)
    if args.json:
        print(json.dumps({"run": final.run_id, **final.summary}, indent=1))
    else:
        console = _stdout()
        console.print(f"run {final.run_id} ({final.status}), results in {store.path}", markup=False)
        for table in summary_tables(final.summary):
            console.print(table)
    return 0


def cmd_runs(args) -> int:
    from lab.summary import summarize

    with _store(args, readonly=True) as store:
        runs = [r for r in store.runs() if args.model in (None, r["model"])]
        summaries = {r["id"]: summarize(store.trials(r["id"])) for r in runs}
    if args.json:
        print(json.dumps([{**r, "summary": summaries[r["id"]]} for r in runs], indent=1))
    else:
        from lab.report import runs_table

        console = _stdout()
        console.print(runs_table(runs, summaries, store.path, console.width))
    return 0


def cmd_export(args) -> int:
    import csv

    if args.sweep is not None:
        return cmd_sweeps(argparse.Namespace(sweep=args.sweep, csv=args.format == "csv", json=args.format == "json",
                                             db=args.db))
    if args.run is None:
        raise LabError("lab export needs a run id (see lab runs) or --sweep ID (see lab sweeps)")
    with _store(args, readonly=True) as store:
        run = store.run(args.run)
        rows = store.trials(args.run)
    if args.format == "json":
        from lab.summary import summarize

        json.dump({"run": {k: run[k] for k in ("id", "name", "model", "status", "started", "finished")},
                   "plan": json.loads(run["plan"]), "summary": summarize(rows), "trials": rows}, sys.stdout, indent=1)
        print()
    else:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return 0


def cmd_sweep(args) -> int:
    from lab import sweeps
    from lab.session import Session
    from lab.sweeps import distributed

    options = sweeps.Options(axis=args.over, layers=sweeps.numbers(args.layers, "--layers") if args.layers else None,
                             values=sweeps.numbers(args.values, "--values") if args.values else None,
                             metric=args.metric, score=args.score, expert_mode=args.expert_mode,
                             controls=args.controls, seed=args.seed).validate()
    preset = _preset(args)
    if args.nproc != 1 and distributed.launched():
        raise LabError("--nproc: this process is a torch.distributed worker already (torchrun); leave --nproc out")
    if args.nproc != 1 or args.gpus_per_replica != 1:
        distributed.check_devices(preset.model, args.nproc, args.gpus_per_replica)
    if args.nproc > 1:
        _store(args).close()  # a database lab cannot write fails here, before any worker starts
        return distributed.launch(cmd_sweep, args, args.nproc)
    if not distributed.launched():
        store = _store(args)
        return _sweep(args, sweeps.run(preset, options, Session.open(preset.model), store), store)
    with distributed.world(preset.model, args.gpus_per_replica) as world:
        if world.rank != 0:
            world.serve()
            return 0
        store = _store(args)
        return _sweep(args, sweeps.run(preset, options, world.session, store, world.execute), store)


def _sweep(args, events, store) -> int:
    """Drive a sweep's events (progress on a terminal), then print its result and its trials per second."""
    from rich.console import Console

    from lab.sweeps.distributed import replicas
    from lab.sweeps.report import drive, sweep_table
    from lab.sweeps.run import Clock

    clock = Clock()
    final = drive(clock.watch(events), args.json)
    if args.json:
        print(json.dumps(final.result, indent=1))
    else:
        console = Console()
        console.print(f"sweep {final.sweep_id} ({final.status}), results in {store.path}", markup=False)
        console.print(sweep_table(final.result))
        console.print(clock.line(replicas()), markup=False)
    return 0


def cmd_sweeps(args) -> int:
    from lab.sweeps import result
    from lab.sweeps.report import sweep_table, sweeps_table, write_csv

    if args.csv and args.sweep is None:
        raise LabError("--csv needs a sweep id: lab sweeps ID --csv")
    with _store(args, readonly=True) as store:
        found = result(store, args.sweep) if args.sweep is not None else store.sweeps()
    if args.csv:
        write_csv(found, sys.stdout)
    elif args.json:
        print(json.dumps(found, indent=1))
    else:
        _stdout().print(sweep_table(found) if args.sweep is not None else sweeps_table(found, store.path))
    return 0


def cmd_heads(args) -> int:
    from lab import presets
    from lab.interventions import Plan
    from lab.probes.heads import SCORES, HeadsSpec, keep_set, ranking, scores
    from lab.session import Session

    if args.score not in SCORES:  # before the scoring work, not after it
        raise LabError(f"--score: {args.score!r} is not one of {', '.join(SCORES)}")
    if args.top < 1:
        raise LabError(f"--top: {args.top} rows; give at least 1")

    spec = HeadsSpec(task=args.task, lengths=tuple(args.lengths), depths=tuple(args.depths), trials=args.trials,
                     max_new_tokens=args.max_new_tokens).validate()
    fraction = _percentage(args.keep) if args.keep else None
    if args.write is not None and not args.write.strip():
        raise LabError("--write: give the path of the preset file to write")
    if args.write:
        if fraction is None:
            raise LabError("--write needs --keep to choose the heads")
        _check_writable(args.write)
    preset = presets.Preset(name=f"{args.model}: head scores", model=_spec(args), heads=spec)
    session = Session.open(preset.model)
    with session.claim("head scoring") as job:
        final = _drive(session.run(preset, _store(args), job), args.json)
    ranked = ranking(scores(final.summary["heads"]), args.score)
    keep = keep_set(ranked, fraction) if fraction is not None else []
    if args.json:
        print(json.dumps({"run": final.run_id, "score": args.score, "keep": [list(k) for k in keep],
                          "ranking": [{"layer": l, "head": h, "value": v} for (l, h), v in ranked]}))
    else:
        from lab.report import heads_table

        _stdout().print(heads_table(ranked, args.score, set(keep), args.top))
    if args.write:  # a preset lab run runs: the needle probe on the grid the heads were scored on
        base = presets.Preset(name=f"{args.model}: keep {args.keep} of heads by {args.score}",
                              description=f"heads scored in run {final.run_id}; [needle] is the grid they were "
                                          "scored on", model=_spec(args), needle=spec.needle())
        path = presets.save(base.with_plan(Plan(keep_heads=tuple(keep))), args.write)
        print(f"wrote {path} (the needle probe on the scoring grid): lab run {path}", file=sys.stderr)
    return 0


def _percentage(text: str) -> float:
    """'15%' or '15' as the fraction 0.15; a LabError unless it is above 0 and at most 100."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise LabError(f"--keep: {text!r} is not a percentage (e.g. 15%)") from None
    if not 0 < value <= 100:
        raise LabError(f"--keep: {text!r} must be above 0 % and at most 100 %")
    return value / 100


def _check_writable(name: str) -> None:
    """Fail before any work when `name` cannot be written as a file (presets.save creates missing folders)."""
    from pathlib import Path

    path = Path(name).expanduser()
    if path.is_dir():
        raise LabError(f"--write {name}: is a directory; give a file name such as keep.toml")
    folder = next(p for p in path.absolute().parents if p.exists())
    if (path.exists() and not os.access(path, os.W_OK)) or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise LabError(f"--write {name}: cannot write there")


MAX_PASSES = 100  # lab bench --passes: more would keep a GPU for hours on Jamba's grid


def cmd_bench(args) -> int:
    from lab.bench import load_for_bench, parse_rows, run_bench
    from lab.report import bench_tables

    rows = parse_rows(args.rows)
    if args.reference is not None and args.reference < 0:
        raise LabError(f"--reference {args.reference}: give a number of prompts >= 0 (0: lab's paths only)")
    if not 1 <= args.passes <= MAX_PASSES:
        raise LabError(f"--passes {args.passes}: give a number of timed passes from 1 to {MAX_PASSES}")
    loaded = load_for_bench(args.model, args.device, args.dtype)
    status = None
    if not args.json and sys.stderr.isatty():
        from rich.console import Console

        status = Console(stderr=True).status("measuring")
        status.start()
    try:
        results = run_bench(loaded, quick=args.quick, rows=rows, reference=args.reference, passes=args.passes,
                            progress=None if status is None else lambda label: status.update(f"measuring {label}"))
    finally:
        if status is not None:
            status.stop()
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        console = _stdout()
        for table in bench_tables(results):
            console.print(table)
    return 0


COLORS = {"auto": "auto", "truecolor": "truecolor", "256": "256", "16": "standard", "mono": "standard"}


def console(args) -> int:
    """Open the console (needs a terminal)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise LabError("the console needs a terminal (try ssh -t); for headless runs use: lab run PRESET")
    os.environ["TEXTUAL_COLOR_SYSTEM"] = COLORS[args.color]
    if args.color == "mono":
        os.environ["NO_COLOR"] = "1"
    from lab import presets
    from lab.models import ModelSpec
    from lab.store import Store
    from lab.tui.app import LabApp

    preset = presets.load(args.preset) if args.preset else None
    if preset and args.model:
        preset = preset.with_model(args.model)
    spec = preset.model if preset else ModelSpec(args.model or ModelSpec().name)
    app = LabApp(spec, preset, Store(args.db), args.preset)
    app.run(mouse=not args.no_mouse)
    return 0


def _preset_args(parser: argparse.ArgumentParser) -> None:
    """A preset to run, another model for it, the flags only a command line may give, and --db."""
    parser.add_argument("preset", help="a .toml file or a name from presets/")
    parser.add_argument("--model", help="override the preset's model")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repo's own code (never a preset's)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow non-safetensors weights (never a preset's)")
    _db_option(parser)


def _db_option(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """--db before or after the command: a command's own option is left out when not given, so that
    `lab --db X runs` keeps X."""
    parser.add_argument("--db", default=default,
                        help="results database (default: $LAB_DB or ~/.local/share/lab/results.sqlite)")


DESCRIPTION = """Ablation experiments on hybrid SSM/recurrent + attention language models.
Without a command, lab opens the console (it needs a terminal: ssh -t)."""
EXAMPLES = """examples:
  lab inspect toy-jamba                   layers, blocks, heads and module paths
  lab run toy-recurrentgemma-base         a builtin preset: needle and MMLU
  lab heads toy-recurrentgemma --keep 15% --write keep15.toml
  lab run keep15.toml                     the needle probe with 15 % of heads
  lab runs                                every run, plan in words, accuracy"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `lab: ...` line and exit 2, like every other bad input."""

    def error(self, message: str):
        command = self.prog.removeprefix("lab").strip()
        print(f"lab: {command + ': ' if command else ''}{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lab", description=DESCRIPTION, epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model for the console (default: the preset's, else toy-recurrentgemma)")
    parser.add_argument("--preset", help="open the console with this preset")
    parser.add_argument("--no-mouse", action="store_true", help="no mouse tracking (kinder to flaky SSH links)")
    parser.add_argument("--color", choices=tuple(COLORS), default="auto",
                        help="colour depth (sets TEXTUAL_COLOR_SYSTEM); NO_COLOR is honoured")
    _db_option(parser, default=None)
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND",
                                help="lab COMMAND --help shows its options")
    p = sub.add_parser("inspect", help="print a model's layers, blocks and heads")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="run a preset headless: probes, results database, summary")
    _preset_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("runs", help="list runs: plan in words, needle and MMLU accuracy, trials, status, age")
    _db_option(p)
    p.add_argument("--model", help="only this model's runs (as the console's Runs tab shows them)")
    p.add_argument("--json", action="store_true", help="print the runs with their summaries as JSON")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("export", help="export one run's trials, or a sweep (one row per condition)")
    p.add_argument("run", type=int, nargs="?", help="the run's id (see lab runs)")
    p.add_argument("--sweep", type=int, metavar="ID",
                   help="export this sweep instead: one row per condition (see lab sweeps)")
    p.add_argument("--format", choices=("csv", "json"), default="csv",
                   help="csv: one row per trial (default); json: the run, its plan, summary and trials")
    _db_option(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="run a preset under every condition of an axis (each layer, head, k...)")
    _preset_args(p)
    p.add_argument("--over", required=True, metavar="AXIS",
                   help="attention-layers, ssm-layers, mlp-layers, heads, kv-heads, experts, k or keep-top")
    p.add_argument("--layers", help="only these layers, e.g. 2,5 (block axes, heads, kv-heads, experts)")
    p.add_argument("--expert-mode", metavar="MODE",
                   help="experts: zero (its output dropped, routing kept) or reroute (top-k picks others); "
                        "default: the preset's, else zero")
    p.add_argument("--values", help="k: e.g. 0,1,8 (default 0..heads); keep-top: percentages (default 5,10,15,25)")
    p.add_argument("--metric", help="k: entropy or l2 (default: the preset's, else entropy)")
    p.add_argument("--score", help="keep-top: retrieval, entropy or needle_mass (default retrieval)")
    p.add_argument("--controls", type=int, default=0, help="random sets of the same size per condition")
    p.add_argument("--seed", type=int, default=0, help="seed of the random controls")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="worker processes, each with a replica of the model (torch.distributed; nccl on GPUs, "
                        "gloo on the CPU); under torchrun leave it out")
    p.add_argument("--gpus-per-replica", type=int, default=1, metavar="M",
                   help="GPUs each replica spreads over (accelerate's device_map); --nproc x this <= GPUs")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sweeps", help="list sweeps, or show one sweep's result (--csv: one row per condition)")
    p.add_argument("sweep", type=int, nargs="?", help="a sweep id (see lab sweeps)")
    p.add_argument("--json", action="store_true", help="print the sweeps, or the sweep's result, as JSON")
    p.add_argument("--csv", action="store_true", help="with a sweep id: one row per condition")
    _db_option(p)
    p.set_defaults(func=cmd_sweeps)

    p = sub.add_parser("heads", help="score attention heads on needle prompts and rank them")
    _model_args(p)
    _db_option(p)
    p.add_argument("--score", default="retrieval",
                   help="rank by retrieval, entropy or needle_mass (default retrieval)")
    p.add_argument("--keep", metavar="PCT", help="percentage of heads to keep, e.g. 15%%")
    p.add_argument("--write", metavar="FILE", help="write a preset that keeps those heads and runs the needle "
                                                   "probe on the grid they were scored on (needs --keep)")
    p.add_argument("--task", default="passkey",
                   help="needle task: sentence, passkey, multikey, multivalue or multiquery (default passkey)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512], metavar="N",
                   help="prompt lengths in tokens (default 512)")
    p.add_argument("--depths", type=float, nargs="+", default=[10, 50, 90], metavar="PCT",
                   help="needle depths in percent of the context (default 10 50 90)")
    p.add_argument("--trials", type=int, default=2, metavar="N", help="prompts per length and depth (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                   help="tokens the model may answer with (default 16)")
    p.add_argument("--top", type=int, default=30, metavar="N", help="rows to print (default 30)")
    p.add_argument("--json", action="store_true", help="print the ranking and the kept heads as JSON")
    p.set_defaults(func=cmd_heads)

    p = sub.add_parser("bench", help="time lab's probe paths against the reference paths")
    p.add_argument("model", nargs="?", default="random:recurrent_gemma",
                   help="a model spec, or config:recurrentgemma-2b / config:recurrentgemma-9b / config:jamba-mini-1.6 "
                        "(published configs with random weights)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or device_map (accelerate)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--quick", action="store_true", help="a small needle grid even on a GPU")
    p.add_argument("--rows", help="measure only these rows, comma-separated: needle, needle-shared, mmlu, plans, prefill")
    p.add_argument("--reference", type=int, metavar="N",
                   help="needle prompts the reference path times (default 10 on a GPU, 4 on a CPU); "
                        "0: lab's paths only")
    p.add_argument("--passes", type=int, default=1, metavar="N",
                   help="time lab's needle and MMLU paths over N passes after the first (compiling) one: the median "
                        "and the range (default 1)")
    p.add_argument("--json", action="store_true", help="print the measures as JSON")
    p.set_defaults(func=cmd_bench)
    for choice in sub._choices_actions:  # each command's --help opens with what the command list says of it
        sub.choices[choice.dest].description = choice.help
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C: a run stops and is marked cancelled."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


@contextmanager
def signals_as_interrupts():
    """SIGTERM and SIGHUP raise Interrupted in the main thread while inside; handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGTERM, signal.SIGHUP) if hasattr(signal, "SIGHUP") else (signal.SIGTERM,)
    before = {signum: signal.signal(signum, _interrupt) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with signals_as_interrupts():
            return args.func(args) if args.command else console(args)
    except LabError as error:
        print(f"lab: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        print(f"lab: interrupted ({signal.Signals(signum).name}); results written so far are kept", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
