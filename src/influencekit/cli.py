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


def _reproduce(args: argparse.Namespace) -> int:
    from . import reproduce

    out = Path(args.out)
    data = Path(args.data) if args.data else None
    if args.name == "all":
        if data is not None:
            raise ValueError("--data applies to one experiment at a time, not to 'all'.")
        records = reproduce.run_all(reproduce.experiments().values(), out, args.seed, args.quick,
                                    echo=print)
        print()
        print(reproduce.summary_table(records))
        print(f"Summary: {(out / 'summary.md').resolve()}")
        return 0
    experiment = reproduce.get(args.name)
    print(f"== {experiment.name}: {experiment.title}")
    record = reproduce.run_experiment(experiment, out, args.seed, args.quick, data)
    print(f"Data: {record.outcome.data}")
    print(reproduce.summary_table([record]))
    for note in record.outcome.notes:
        print(f"- {note}")
    print(f"Results: {(record.settings.out / 'results.json').resolve()}")
    for figure in record.outcome.figures:
        print(f"Figure:  {figure.resolve()}")
    return 0


def _subject(args: argparse.Namespace):
    from .explain import load_subject

    return load_subject(args.model, args.train, args.test, setup=args.setup,
                        label_column=args.label_column, objective=args.objective)


def _damping(text: str | None) -> float | str | None:
    return text if text in (None, "auto") else float(text)


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain

    summary = explain(_subject(args), args.out, test_index=args.test_index, top_k=args.k,
                      check=args.check, solver=args.solver, damping=_damping(args.damping),
                      curvature=args.curvature, max_test=args.max_test)
    print(f"Solver: {summary['solver']} ({summary['solver_reason']}).")
    print(f"Explained {len(summary['points'])} test points: {summary['test_points']}.")
    if "check" in summary:
        print(f"Check against {len(summary['check']['removed'])} refits: Pearson R = "
              f"{summary['check']['pearson']:.3f}")
    out = Path(args.out).resolve()
    print(f"Report: {out / 'report.html'}  (scores.npz, explain.json beside it)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from .explain import audit

    summary = audit(_subject(args), args.out, top=args.top, solver=args.solver,
                    damping=_damping(args.damping), curvature=args.curvature)
    print(f"Solver: {summary['solver']} ({summary['solver_reason']}).")
    first = ", ".join(str(r["index"]) for r in summary["ranked"][:10])
    print(f"Training points to check first (most negative self-influence): {first}")
    print(f"Report: {Path(args.out).resolve() / 'report.html'}")
    return 0


def _files_arguments(command: argparse.ArgumentParser, out: str) -> None:
    command.add_argument("--model", help="a scikit-learn model saved with skops (.skops) or a "
                                         "torch.export archive (.pt2); never a pickle")
    command.add_argument("--train", help="training data: .npz (X, y), .csv (with a label "
                                         "column), .pt ({'X','y'}), .txt/.tsv ('label<TAB>text') "
                                         "or a folder of images per class")
    command.add_argument("--setup", help="module:function returning a dict with model, "
                                         "objective, train, test (instead of the files)")
    command.add_argument("--label-column", default=None,
                         help="CSV label column (default: 'label', else the last)")
    command.add_argument("--objective", default="cross-entropy",
                         choices=["cross-entropy", "logistic", "mse"],
                         help="the loss of a PyTorch model (default cross-entropy)")
    command.add_argument("--solver", default=None, choices=["direct", "cg", "lissa", "kfac",
                                                            "ekfac", "arnoldi"],
                         help="default: chosen by the model's size (the report says why)")
    command.add_argument("--damping", default=None, help="a number or 'auto' (default: 0 for "
                         "regularised scikit-learn models, else auto)")
    command.add_argument("--curvature", default=None, choices=["hessian", "gauss-newton"],
                         help="default: the Hessian for convex scikit-learn models, the "
                              "Gauss-Newton matrix for networks")
    command.add_argument("--out", default=out, help=f"output folder (default {out})")


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

    reproduce = commands.add_parser(
        "reproduce", help="reproduce an experiment of Koh & Liang (2017), or all of them")
    reproduce.add_argument("name", help="experiment name (see `influencekit experiments`) or 'all'")
    reproduce.add_argument("--out", default="outputs/reproduce",
                           help="folder; each experiment writes OUT/NAME/results.json")
    reproduce.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    reproduce.add_argument("--quick", action="store_true", help="small variant, seconds each")
    reproduce.add_argument("--data", default=None,
                           help="path to the paper's original data in its public format")
    reproduce.set_defaults(handler=_reproduce)

    explain = commands.add_parser(
        "explain", help="which training points made your model predict this? (your files)")
    _files_arguments(explain, "outputs/explain")
    explain.add_argument("--test", help="test data, same formats as --train")
    explain.add_argument("--test-index", type=int, nargs="+", default=None,
                         help="test points to explain (default: the misclassified ones)")
    explain.add_argument("--max-test", type=_at_least(1), default=20,
                         help="at most this many default test points (default 20)")
    explain.add_argument("--k", type=_at_least(1), default=5,
                         help="helpful and harmful training points per test point (default 5)")
    explain.add_argument("--check", type=int, default=0, metavar="N",
                         help="refit without each test point's N most influential training "
                              "points and compare (scikit-learn models, or --setup retrain)")
    explain.set_defaults(handler=_explain)

    audit = commands.add_parser(
        "audit", help="rank training points by self-influence: likely mislabelled ones first")
    _files_arguments(audit, "outputs/audit")
    audit.set_defaults(handler=_audit, test=None)
    audit.add_argument("--top", type=_at_least(1), default=20,
                       help="training points shown in the report (default 20)")

    listing = commands.add_parser("experiments", help="list the reproducible experiments")
    listing.set_defaults(handler=_list_experiments)
    return parser


def _list_experiments(args: argparse.Namespace) -> int:
    from . import reproduce

    for name, experiment in reproduce.experiments().items():
        print(f"{name:24s} {experiment.title}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (ValueError, RuntimeError, OSError) as error:
        print(f"influencekit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
