"""The side-by-side comparison on every benchmark problem, and the performance claims that hold on
all of them (issue 14).

Runs ``compare.py --core --problem NAME`` for each problem of ``problem.PROBLEMS`` (each method in
its own process, as there), then prints and saves one summary: per problem, the exact family at
matched accuracy (our block CG with preconditioner="auto" against the fastest pyDVL block-CG run
within rel. error 1e-4) and the Kronecker family (influencekit's best row within kronfluence's
EK-FAC time against the best peer, by whole-matrix and mean per-query Pearson R), each with its
verdict, and which claims hold on every problem. Writes ``compare_problems.json``.

Run: ``.bench-venv/bin/python benchmarks/compare_problems.py --out outputs/bench`` (``make bench``
does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402

import matched  # noqa: E402
import problem as problem_module  # noqa: E402


def _results(out: Path, name: str) -> dict:
    return json.loads((problem_module.results_folder(out, name) / "compare.json").read_text())


def _summary(name: str, payload: dict) -> dict:
    results = compare.completed(payload["results"])
    deflated = results.get("influencekit-cg-deflated", {})
    mine, matched = compare.matched_ours(results), compare.matched_pydvl(results)
    kron = results.get("kronfluence-ekfac", {}).get("seconds")
    ours_k = compare.best_kronecker(results, ours=True, within=kron)
    peer_k = compare.best_kronecker(results, ours=False)
    row: dict = {"problem": name, "model": payload["problem"]["model"],
                 "data": payload["problem"]["data"]}
    if mine and matched:
        ours = mine[1]
        row["exact"] = {
            "ours_method": mine[0], "ours_seconds": ours["seconds"],
            "ours_relative_error": ours["relative_error"],
            "deflated_seconds": deflated.get("seconds"),
            "deflated_relative_error": deflated.get("relative_error"),
            "ours_iterations": ours.get("iterations"), "ours_products": ours.get("products"),
            "pydvl_method": matched[0], "pydvl_seconds": matched[1]["seconds"],
            "pydvl_relative_error": matched[1]["relative_error"],
            "ratio": ours["seconds"] / matched[1]["seconds"],
            "met": ours["seconds"] <= 0.5 * matched[1]["seconds"]}
    if kron and ours_k and peer_k:
        o, q = ours_k[1], peer_k[1]
        row["kronecker"] = {
            "ours_method": ours_k[0], "ours_seconds": o["seconds"],
            "ours_pearson_all": o["pearson_flat"], "ours_pearson_rows": o["pearson_rows_mean"],
            "peer_method": peer_k[0], "peer_seconds": q["seconds"],
            "peer_pearson_all": q["pearson_flat"], "peer_pearson_rows": q["pearson_rows_mean"],
            "kronfluence_seconds": kron,
            "met": o["pearson_flat"] >= q["pearson_flat"]
            and o["pearson_rows_mean"] >= q["pearson_rows_mean"]}
    return row


def _exact_line(e: dict) -> str:
    return (f"{e['ours_seconds']:13.2f} {e['ours_relative_error']:8.1e} {e['pydvl_seconds']:8.2f} "
            f"{e['pydvl_relative_error']:8.1e} {e['ratio']:6.2f}  "
            f"{'PASS' if e['met'] else 'FAIL'} ({e['ours_method']}; {e['pydvl_method']}; "
            f"{e['ours_iterations']} iterations, {e['ours_products']} products)")


def _kronecker_line(k: dict) -> str:
    return (f"{k['ours_method']:32s} {k['ours_pearson_all']:6.3f} {k['ours_pearson_rows']:6.3f} "
            f"{k['ours_seconds']:6.2f} | {k['peer_method']:28s} {k['peer_pearson_all']:6.3f} "
            f"{k['peer_pearson_rows']:6.3f} {k['peer_seconds']:6.2f}  "
            f"{'PASS' if k['met'] else 'FAIL'}")


def _lines(rows: list[dict]) -> list[str]:
    lines: list[str] = []
    for family, title, header, line in (
            ("exact", "exact", f"{'exact: ours s':>13s} {'rel.err':>8s} {'pyDVL s':>8s} "
             f"{'rel.err':>8s} {'ratio':>6s}  verdict", _exact_line),
            ("kronecker", "Kronecker", f"{'Kronecker: ours':32s} {'R all':>6s} {'R rows':>6s} "
             f"{'s':>6s} | {'best peer':28s} {'R all':>6s} {'R rows':>6s} {'s':>6s}",
             _kronecker_line)):
        lines += [*([""] if lines else []), f"{'problem':20s} {header}"]
        for row in rows:
            figures = row.get(family)
            lines.append(f"{row['problem']:20s} " + (
                f"{title}: not measured (a row failed)" if figures is None else line(figures)))
    for family in ("exact", "kronecker"):
        verdicts = [row.get(family, {}).get("met") for row in rows]
        held = "holds" if all(v is True for v in verdicts) else "does NOT hold"
        lines.append(f"{family}: {held} on every problem "
                     f"({sum(v is True for v in verdicts)} of {len(rows)} met)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--problems", nargs="*", default=list(problem_module.PROBLEMS))
    parser.add_argument("--summary-only", action="store_true",
                        help="summarise the compare.json files already in --out")
    parser.add_argument("--reuse", nargs="*", default=[], help="passed on to compare.py")
    parser.add_argument("--quick", type=float, default=30.0,
                        help="passed on to compare.py: methods under this many seconds run twice")
    args = parser.parse_args()
    out = Path(args.out)
    for name in [] if args.summary_only else args.problems:
        print(f"== {name}", flush=True)
        command = [sys.executable, str(HERE / "compare.py"), "--out", str(out), "--core",
                   "--problem", name, "--quick", str(args.quick)]
        if args.reuse:
            command += ["--reuse", *args.reuse]
        subprocess.run(command, check=True)
    rows = [_summary(name, _results(out, name)) for name in args.problems]
    lines = _lines(rows)
    print("\n".join(lines))
    from influencekit.io import atomic_write_json

    path = atomic_write_json(out / "compare_problems.json",
                             {"benchmark": "compare_problems", "date": time.strftime("%Y-%m-%d"),
                              "matched_bar": matched.BAR, "rows": rows, "table": lines})
    print(f"\nSaved {path}")


if __name__ == "__main__":
    main()
