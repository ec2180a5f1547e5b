"""The `lab` command line: console by default; inspect, run, heads, runs, export, bench."""

from __future__ import annotations

import argparse
import json
import sys

from lab.errors import LabError


def _model_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    if default is None:
        parser.add_argument("model", help="builtin name, random:<type>, local directory or hub id")
    else:
        parser.add_argument("--model", default=default, help="builtin name, random:<type>, directory or hub id")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or device_map (accelerate)")
    parser.add_argument("--attn", dest="attn_implementation", default=None, help="eager, sdpa, ...")
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
        from rich.console import Console

        Console().print(anatomy_table(loaded))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("inspect", help="print a model's layers, blocks and heads")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except LabError as error:
        print(f"lab: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lab: interrupted; results written so far are kept", file=sys.stderr)
        return 130
