"""Repeated, interleaved timing of the exact family at matched accuracy (issue 14).

compare.py times each method once (twice when it is quick) and the matched check compares single
runs; on a shared 2-core machine the same solve varies by ±15% from run to run. This script reruns
the three rows that check compares, for each problem:

- ours: our block CG (preconditioner="auto") at its matched tolerance,
- pyDVL: pyDVL's block CG at its matched rtol, as shipped,
- pyDVL, retained heap: the same pyDVL run with glibc keeping freed memory as influencekit's own
  calls do (``matched.RETAINED_HEAP``),

``--rounds`` times, interleaved, the order rotating each round, so that a slow spell of the
machine falls on every row alike. Each run is its own process (peers/run_one.py, as in
compare.py). Reported per row: the median, least and greatest seconds and the largest rel. error
over its runs; per pair: the ratio of the medians and the range of the ratios within a round;
per run, its system CPU seconds and minor page faults (peers/run_one.py's ``process``), which
show how much of a run went to faulting in fresh memory.
A row is matched only if every one of its runs stays within rel. error ``matched.BAR``.

The rows come from each problem's compare.json (``compare.matched_ours`` / ``matched_pydvl``);
``--rows PROBLEM=OURS,PYDVL`` names them instead. Writes ``matched_repeats.json``.

Run: ``.bench-venv/bin/python benchmarks/matched_repeats.py --out outputs/bench`` (``make bench``
does, after compare_problems.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402

import matched  # noqa: E402
import problem as problem_module  # noqa: E402

ROLES = ("ours", "pydvl", "pydvl_retained_heap")


def rows_from_compare(out: Path, name: str) -> dict[str, str]:
    """The matched rows of ``name``'s compare.json: {role: method}."""
    path = problem_module.results_folder(out, name) / "compare.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run compare.py --core --problem {name} first, or "
                         f"name the rows with --rows {name}=OURS,PYDVL.")
    results = json.loads(path.read_text())["results"]
    mine, theirs = compare.matched_ours(results), compare.matched_pydvl(results)
    if mine is None or theirs is None:
        raise SystemExit(f"{path} has no exact-family rows within rel. error {matched.BAR:g} "
                         f"(its last run may have been another family): rerun compare.py "
                         f"--core --problem {name}, or name the rows with --rows "
                         f"{name}=OURS,PYDVL.")
    return roles(mine[0], theirs[0])


def roles(ours: str, pydvl: str) -> dict[str, str]:
    return {"ours": ours, "pydvl": pydvl, "pydvl_retained_heap": pydvl + matched.RETAINED_HEAP}


def parse_rows(entries: list[str]) -> dict[str, dict[str, str]]:
    named: dict[str, dict[str, str]] = {}
    for entry in entries:
        name, _, methods = entry.partition("=")
        parts = methods.split(",")
        if name not in problem_module.PROBLEMS or len(parts) != 2 or not all(parts):
            raise SystemExit(f"--rows takes PROBLEM=OURS,PYDVL with PROBLEM one of "
                             f"{', '.join(problem_module.PROBLEMS)}; got {entry!r}.")
        named[name] = roles(*parts)
    return named


def rotated(items: tuple[str, ...], by: int) -> list[str]:
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def summary(runs: dict[str, list[dict]]) -> dict:
    """Medians, ranges and ratios of one problem's runs ({role: [result per round]})."""
    rows: dict = {}
    for role, results in runs.items():
        seconds = [r.get("seconds") for r in results]
        errors = [r.get("relative_error") for r in results]
        failed = [r.get("error") for r in results if r.get("error")]
        complete = not failed and all(s is not None for s in seconds)
        rows[role] = {"method": results[0]["method"], "seconds": seconds,
                      "relative_errors": errors, "errors": failed,
                      "process": [r.get("process") for r in results],
                      "median_seconds": statistics.median(seconds) if complete else None,
                      "matched": complete and all(e is not None and e <= matched.BAR
                                                  for e in errors)}
    for peer in ("pydvl", "pydvl_retained_heap"):
        a, b = rows["ours"], rows[peer]
        if a["median_seconds"] is None or b["median_seconds"] is None:
            continue
        within = [x / y for x, y in zip(a["seconds"], b["seconds"], strict=True)]
        rows[f"ratio_to_{peer}"] = {"of_medians": a["median_seconds"] / b["median_seconds"],
                                    "per_round_min": min(within),
                                    "per_round_max": max(within)}
    return rows


def usage_text(seconds: float | None, usage: dict | None) -> str:
    """"7.04 / 0.48 / 195k": a run's seconds, system CPU seconds and minor page faults."""
    if seconds is None:
        return "failed"
    if usage is None:  # a result file from before run_one recorded its process usage
        return f"{seconds:.2f}"
    return (f"{seconds:.2f} / {usage['system_seconds']:.2f} / "
            f"{usage['minor_page_faults'] / 1000:.0f}k")


def lines(results: dict[str, dict]) -> list[str]:
    header = (f"{'problem':20s} {'ours s (min-max)':>22s} {'pyDVL s':>22s} {'ratio':>16s} "
              f"{'pyDVL retained s':>22s} {'ratio':>16s}")
    out = [header]

    def seconds(row: dict) -> str:
        if row["median_seconds"] is None:
            return f"{'failed':>22s}"
        flag = "" if row["matched"] else "*"
        return (f"{row['median_seconds']:8.2f}{flag:1s} ({min(row['seconds']):.2f}-"
                f"{max(row['seconds']):.2f})").rjust(22)

    def ratio(r: dict | None) -> str:
        if r is None:
            return f"{'-':>16s}"
        return (f"{r['of_medians']:.2f}x ({r['per_round_min']:.2f}-"
                f"{r['per_round_max']:.2f})").rjust(16)

    for name, rows in results.items():
        out.append(f"{name:20s} {seconds(rows['ours'])} {seconds(rows['pydvl'])} "
                   f"{ratio(rows.get('ratio_to_pydvl'))} "
                   f"{seconds(rows['pydvl_retained_heap'])} "
                   f"{ratio(rows.get('ratio_to_pydvl_retained_heap'))}")
    out.append("Medians over the rounds (least-greatest run); ratios: of the medians (least-"
               "greatest within one round). * a run of that row exceeded rel. error "
               f"{matched.BAR:g}.")
    out.append("Per run, in round order: seconds / system CPU seconds / minor page faults "
               "(thousands) of the call:")
    for name, rows in results.items():
        for role in ROLES:
            out.append(f"  {name} {role}: " + ", ".join(
                usage_text(run_seconds, usage)
                for run_seconds, usage in zip(rows[role]["seconds"], rows[role]["process"],
                                              strict=True)))
    for peer, title in (("pydvl", "pyDVL as shipped"),
                        ("pydvl_retained_heap", "pyDVL with the retained heap")):
        ratios = [rows.get(f"ratio_to_{peer}") for rows in results.values()]
        ok = [r is not None and r["of_medians"] <= 0.5 and all(
              rows[role]["matched"] for role in ("ours", peer))
              for r, rows in zip(ratios, results.values(), strict=True)]
        out.append(f"exact ≤ 0.5× {title} (ratio of medians, every run matched): "
                   f"{sum(ok)} of {len(ok)} problems")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--problems", nargs="*", default=list(problem_module.PROBLEMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--rows", nargs="*", default=[],
                        help="PROBLEM=OURS,PYDVL: the rows to time instead of compare.json's")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}.")
    out = Path(args.out)
    named = parse_rows(args.rows)
    plan = {name: named.get(name) or rows_from_compare(out, name) for name in args.problems}
    results: dict[str, dict] = {}
    versions: dict[str, str] = {}
    for name, methods in plan.items():
        problem_path = problem_module.prepare(out, 0, name)
        repeats = problem_module.results_folder(out, name) / "repeats"
        runs: dict[str, list[dict]] = {role: [] for role in ROLES}
        for round_ in range(args.rounds):
            for role in rotated(ROLES, round_):
                print(f"{name} round {round_ + 1}: {methods[role]} ...", flush=True)
                runs[role].append(compare._run(
                    sys.executable, problem_path, methods[role],
                    repeats, args.threads, args.timeout,
                    suffix=f"-round-{round_ + 1}"))
        versions.update({r["library"]: r.get("version") for role_runs in runs.values()
                         for r in role_runs if r.get("library")})
        results[name] = summary(runs)
    table = lines(results)
    print("\n".join(table))
    from influencekit.io import atomic_write_json

    payload = {"benchmark": "matched_repeats", "date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": {"machine": platform.machine(), "processor": platform.processor(),
                           "threads": args.threads},
               "versions": {"torch": torch.__version__, "python": platform.python_version(),
                            **versions},
               "rounds": args.rounds, "matched_bar": matched.BAR, "problems": results,
               "table": table}
    path = atomic_write_json(out / "matched_repeats.json",
                             json.loads(json.dumps(payload, default=str)))
    print(f"\nSaved {path}")


if __name__ == "__main__":
    main()
