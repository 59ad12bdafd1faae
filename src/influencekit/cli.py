"""Command line: ``influencekit demo``. Thin: parses arguments and calls the public API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    print("influencekit demo: which training images made a logistic regression misread a digit?")
    result = run_demo(Path(args.out), num_check=args.num_check, k=args.k,
                      weight_decay=args.weight_decay, solver=args.solver,
                      progress=not args.no_progress, echo=print)
    print(f"Done. Figures and results.json are in {Path(args.out).resolve()}")
    return 0 if result.pearson == result.pearson else 1


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influencekit",
        description="Influence functions (Koh & Liang 2017): which training points made the "
                    "model predict this?")
    parser.add_argument("--version", action="version", version=f"influencekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="explain a misclassified digit and check against leave-one-out retraining")
    demo.add_argument("--out", default="outputs/demo", help="folder for figures and results.json")
    demo.add_argument("--num-check", type=_at_least(2), default=50,
                      help="training points to check by actual refits (default 50)")
    demo.add_argument("--k", type=_at_least(1), default=5, help="helpful/harmful images to show")
    demo.add_argument("--weight-decay", type=float, default=0.01, help="L2 λ (default 0.01)")
    demo.add_argument("--solver", default="direct", choices=["direct", "cg", "lissa"])
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (ValueError, RuntimeError) as error:
        print(f"influencekit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
