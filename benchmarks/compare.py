"""influencekit against captum, kronfluence, pyDVL and dattri, side by side, in one run.

Every method scores the same training points against the same 100 test points of one shared problem
(problem.py; by default the MLP 64-256-256-10 on digits, ``--problem`` picks another; Hessian of the
mean cross-entropy + damping 1e-3), each in its own process (so that its peak memory is its own),
and is compared with the float64 reference. The table gives time, peak memory (VmHWM of the process,
imports and data included), relative error ‖S − R‖_F/‖R‖_F and Pearson R (over the whole matrix, and
the mean over test points), with ratios to the fastest peer of the same family and to the floor (one
pass of per-example gradients). A JSON file records versions, settings and every figure; the checks
of issues 4 and 14 are printed at the end. The exact family is also compared at matched accuracy:
pyDVL's block CG runs at several tolerances, and the fastest run within the rel. error bar of 1e-4
is the one our exact solve is measured against (``--core`` runs only the rows those checks need).

Run: ``make bench`` (or ``.bench-venv/bin/python benchmarks/compare.py --out outputs/bench``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import matched  # noqa: E402
import problem as problem_module  # noqa: E402

FAMILIES: dict[str, list[str]] = {
    "exact (CG)": ["influencekit-cg-deflated",
                   *(f"influencekit-cg-deflated-tol-{tol:g}" for tol in matched.OURS_TOLS),
                   "influencekit-cg-deflated-full-width",
                   "influencekit-cg-deflated-independent", "influencekit-cg-ekfac",
                   *(f"influencekit-cg-plain-tol-{tol:g}" for tol in (2e-4, *matched.OURS_TOLS)),
                   "influencekit-cg-auto",
                   *(f"influencekit-cg-auto-tol-{tol:g}" for tol in matched.OURS_TOLS),
                   "influencekit-cg-auto-negligible",
                   *(f"influencekit-cg-auto-whole-batch-tol-{tol:g}" for tol in
                     (1e-4, 2e-4, 5e-4)),
                   "influencekit-cg-deflated-40", "pydvl-cg-block",
                   *(f"pydvl-cg-block-rtol-{rtol:g}" for rtol in matched.PYDVL_RTOLS),
                   *(f"pydvl-cg-block-rtol-{rtol:g}{matched.RETAINED_HEAP}"
                     for rtol in matched.PYDVL_RTOLS), "pydvl-cg",
                   "dattri-cg"],
    "fast and faithful": ["influencekit-cg-deflated-3"],
    "LiSSA": ["influencekit-lissa-ekfac", "pydvl-lissa", "dattri-lissa"],
    "low rank": ["influencekit-arnoldi-50", "pydvl-arnoldi", "captum-arnoldi", "dattri-arnoldi"],
    "Kronecker": ["influencekit-ekfac", "influencekit-kfac", "influencekit-ekfac-classic",
                  "influencekit-kfac-classic", "influencekit-ekfac-deflated-40",
                  "kronfluence-ekfac", "kronfluence-ekfac-empirical", "pydvl-ekfac",
                  "dattri-ekfac"],
    "context": ["influencekit-cg-gauss-newton", "influencekit-gradient-dot"],
}


# The rows the checks of issue 14 need, for the run over every problem (compare_problems.py).
CORE = ["influencekit-cg-auto", *(f"influencekit-cg-auto-tol-{tol:g}" for tol in
                                 matched.OURS_TOLS), "influencekit-cg-auto-negligible",
        "influencekit-cg-deflated",
        *(f"pydvl-cg-block-rtol-{rtol:g}" for rtol in matched.PYDVL_RTOLS),
        "influencekit-ekfac", "influencekit-kfac", "influencekit-ekfac-classic",
        "influencekit-kfac-classic", "influencekit-ekfac-deflated-40", "kronfluence-ekfac",
        "kronfluence-ekfac-empirical", "pydvl-ekfac", "dattri-ekfac"]


def finished(result: dict) -> bool:
    """Whether a run finished: a time and no error. A failed run may still carry the seconds it
    took to fail, which must never serve as a peer's time in a ratio or a check."""
    return result.get("seconds") is not None and not result.get("error")


def completed(results: dict[str, dict]) -> dict[str, dict]:
    """The rows of ``results`` that :func:`finished`."""
    return {m: r for m, r in results.items() if finished(r)}


def _fastest_within_bar(results: dict[str, dict],
                        names: Callable[[str], bool]) -> tuple[str, dict] | None:
    runs = [(m, r) for m, r in completed(results).items()
            if names(m) and r["relative_error"] <= matched.BAR]
    return min(runs, key=lambda item: item[1]["seconds"]) if runs else None


def matched_pydvl(results: dict[str, dict], retained_heap: bool = False
                  ) -> tuple[str, dict] | None:
    """The fastest pyDVL block-CG run (any tolerance) whose rel. error is within matched.BAR:
    pyDVL as shipped, or (``retained_heap``) its rows run with glibc keeping freed memory as
    influencekit's own calls do (peers/pydvl_methods.with_retained_heap)."""
    return _fastest_within_bar(results, lambda m: m.startswith("pydvl-cg-block")
                               and m.endswith(matched.RETAINED_HEAP) == retained_heap)


def matched_ours(results: dict[str, dict]) -> tuple[str, dict] | None:
    """The fastest run of our block CG with preconditioner="auto" (at its tol 2e-4 or one of
    matched.OURS_TOLS) whose rel. error is within matched.BAR: our tolerance is swept as
    pyDVL's is."""
    return _fastest_within_bar(results, lambda m: m == "influencekit-cg-auto"
                               or m.startswith("influencekit-cg-auto-tol-"))


def best_kronecker(results: dict[str, dict], ours: bool,
                   within: float | None = None) -> tuple[str, dict] | None:
    """The Kronecker-family row with the highest whole-matrix Pearson R, among influencekit's
    rows (``ours``) or the peers', optionally only those that took at most ``within`` s."""
    rows = [(m, r) for m in FAMILIES["Kronecker"]
            if m.startswith("influencekit") == ours
            and finished(r := results.get(m, {}))
            and r.get("pearson_flat") is not None
            and (within is None or r["seconds"] <= within)]
    return max(rows, key=lambda item: item[1]["pearson_flat"]) if rows else None


def _best_of(python: str, problem_path: Path, method: str, out: Path, threads: int,
             timeout: int, quick: float) -> dict:
    """One run; a method that took under ``quick`` seconds runs once more and the faster run is
    kept (the same rule for every library: a 2-core machine shared with others is noisy)."""
    first = _run(python, problem_path, method, out, threads, timeout)
    if not finished(first) or first["seconds"] >= quick:
        return first
    second = _run(python, problem_path, method, out, threads, timeout, suffix="-2")
    if not finished(second):
        return first
    best = min(first, second, key=lambda r: r["seconds"])
    best["runs_seconds"] = [first["seconds"], second["seconds"]]
    return best


def _reused(out: Path, method: str) -> dict:
    """The faster of a method's result files from an earlier run (for the slowest peers, or to
    finish an interrupted run), marked as such; an error entry if there is none."""
    paths = [path for path in (out / "results" / f"{method}.pt",
                               out / "results" / f"{method}-2.pt") if path.exists()]
    found = [(path, torch.load(path, weights_only=False)) for path in paths]
    timed = [(path, r) for path, r in found if finished(r)]
    if not timed:
        return {"method": method, "error": "no result in the previous run"
                + (f": {found[0][1]['error']}" if found and found[0][1].get("error") else "")}
    path, result = min(timed, key=lambda item: item[1]["seconds"])
    result.pop("scores", None)
    measured = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    result["note"] = f"reused from an earlier run on this machine ({measured})"
    return result


def _run(python: str, problem_path: Path, method: str, out: Path, threads: int,
         timeout: int, suffix: str = "") -> dict:
    target = out / "results" / f"{method}{suffix}.pt"
    command = [python, str(HERE / "peers" / "run_one.py"), "--problem", str(problem_path),
               "--method", method, "--out", str(target), "--threads", str(threads)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                   check=False)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout} s"}
    if not target.exists():
        printed = (completed.stderr or completed.stdout).strip()
        return {"method": method, "error": printed[-2000:] if printed else
                f"the process exited with code {completed.returncode} and printed nothing "
                "(a negative code is the signal that ended it: -9 is SIGKILL, e.g. the kernel's "
                "out-of-memory killer)"}
    result = torch.load(target, weights_only=False)
    result.pop("scores", None)
    return result


def _floors(python: str, problem_path: Path, threads: int) -> dict[str, float]:
    """The floors, timed in a process of their own (this script in --floors-worker mode)."""
    completed = subprocess.run([python, __file__, "--threads", str(threads), "--floors-worker",
                                str(problem_path)], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _finite(value: object) -> object:
    """The payload with NaN/inf replaced by None, so that it is standard JSON."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _gib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**30:.2f}"


def _table(results: dict[str, dict], floor: float) -> list[str]:
    lines = [f"{'family / method':44s} {'time s':>8s} {'×peer':>6s} {'×floor':>7s} "
             f"{'mem GiB':>8s} {'rel.err':>9s} {'R(all)':>7s} {'R(rows)':>7s}  note"]
    done = completed(results)
    for family, methods in FAMILIES.items():
        lines.append(f"-- {family}")
        peers = [done[m]["seconds"] for m in methods
                 if not m.startswith("influencekit") and m in done]
        fastest_peer = min(peers) if peers else None
        if family == "exact (CG)" and (matched := matched_pydvl(results)) is not None:
            fastest_peer = matched[1]["seconds"]  # the peer at matched accuracy
        for method in methods:
            if method not in results:  # not asked for in this run
                continue
            r = results[method]
            if not finished(r):
                message = str(r.get("error", "no result")).strip().splitlines()
                reason = (message or ["(no message)"])[-1][:60]
                lines.append(f"   {method:41s} failed: {reason}")
                continue
            ratio = f"{r['seconds'] / fastest_peer:6.2f}" if fastest_peer else "      "
            lines.append(
                f"   {method:41s} {r['seconds']:8.2f} {ratio} {r['seconds'] / floor:7.1f} "
                f"{_gib(r.get('peak_rss_bytes')):>8s} {r['relative_error']:9.1e} "
                f"{r['pearson_flat']:7.4f} {r['pearson_rows_mean']:7.4f}  "
                f"{r.get('note', '')}")
    return lines


def _checks(results: dict[str, dict]) -> list[str]:
    results = completed(results)

    def get(method: str, key: str) -> float | None:
        return results.get(method, {}).get(key)

    def verdict(ok: bool | None) -> str:
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")

    checks = []
    pydvl_block = get("pydvl-cg-block", "seconds")
    ours_exact = results.get("influencekit-cg-deflated", {})
    ok = None
    if pydvl_block and ours_exact.get("seconds"):
        ok = (ours_exact["relative_error"] <= 1e-4 and ours_exact["seconds"] < pydvl_block / 2
              and ours_exact["peak_rss_bytes"] < 1.5e9)
    checks.append(f"{verdict(ok)} exact: rel. error ≤ 1e-4 in < ½ pyDVL block CG's time, "
                  f"peak memory < 1.5 GB")
    block, independent = (get("influencekit-cg-deflated", "iterations"),
                          get("influencekit-cg-deflated-independent", "iterations"))
    errors = (get("influencekit-cg-deflated", "relative_error"),
              get("influencekit-cg-deflated-independent", "relative_error"))
    ok = None if not (block and independent and all(errors)) else (
        block < independent and max(errors) <= 1.5e-4)
    products = (get("influencekit-cg-deflated", "products"),
                get("influencekit-cg-deflated-independent", "products"))
    checks.append(f"{verdict(ok)} block CG iterations ({block}) < independent CG ({independent}) "
                  f"at the same accuracy (rel. errors {errors[0]:.1e}, {errors[1]:.1e}; "
                  f"Hessian-vector products {products[0]} vs {products[1]})"
                  if all(errors) else f"{verdict(ok)} block vs independent CG iterations")
    kron = get("kronfluence-ekfac", "seconds")
    fast = results.get("influencekit-cg-deflated-3", {})
    ok = None if not (kron and fast.get("seconds")) else (
        fast["pearson_flat"] >= 0.99 and fast["seconds"] <= 3 * kron)
    checks.append(f"{verdict(ok)} fast and faithful: Pearson ≥ 0.99 in ≤ 3× kronfluence EK-FAC")
    kronecker = [m for m in FAMILIES["Kronecker"] if not m.startswith("influencekit")]
    best_peer = max((get(m, "pearson_flat") or -1) for m in kronecker)
    ours_k = results.get("influencekit-ekfac", {})
    ok = None if not (kron and ours_k.get("seconds")) else (
        ours_k["pearson_flat"] >= best_peer and ours_k["seconds"] <= kron)
    checks.append(f"{verdict(ok)} Kronecker: Pearson ≥ best peer ({best_peer:.3f}) in ≤ "
                  "kronfluence EK-FAC's time (influencekit-ekfac)")
    hybrid = results.get("influencekit-ekfac-deflated-40", {})
    ok = None if not (kron and hybrid.get("seconds")) else (
        hybrid["pearson_flat"] >= best_peer and hybrid["seconds"] <= kron)
    checks.append(f"{verdict(ok)} (alternative) EK-FAC deflated by 40 Lanczos Ritz pairs: "
                  "the same test")
    low_rank = [m for m in FAMILIES["low rank"] if not m.startswith("influencekit")]
    best_lr = max((get(m, "pearson_flat") or -1) for m in low_rank)
    fastest_lr = min((get(m, "seconds") or float("inf")) for m in low_rank)
    ours_a = results.get("influencekit-arnoldi-50", {})
    ok = None if not ours_a.get("seconds") else (
        ours_a["pearson_flat"] > best_lr and ours_a["seconds"] < fastest_lr)
    checks.append(f"{verdict(ok)} Arnoldi rank 50: Pearson > best peer ({best_lr:.3f}) in less "
                  "time than the peers' Arnoldi")
    lissa_peer = get("pydvl-lissa", "seconds")
    ours_l = results.get("influencekit-lissa-ekfac", {})
    ok = None if not (lissa_peer and ours_l.get("seconds")) else (
        ours_l["pearson_flat"] >= 0.99 and ours_l["seconds"] < lissa_peer)
    checks.append(f"{verdict(ok)} LiSSA: Pearson ≥ 0.99 in less time than pyDVL's LiSSA")
    checks.append(_matched_check(results, verdict))
    checks.append(_kronecker_check(results, verdict))
    return checks


def _matched_check(results: dict[str, dict], verdict: Callable) -> str:
    mine, theirs = matched_ours(results), matched_pydvl(results)
    if mine is None or theirs is None:
        return (f"{verdict(None)} exact at matched accuracy: needs a run of our block CG "
                f"(preconditioner='auto') and a pyDVL block-CG run within rel. error "
                f"{matched.BAR:g}")
    (ours_name, ours), (name, peer) = mine, theirs
    ok = ours["seconds"] <= 0.5 * peer["seconds"]
    line = (f"{verdict(ok)} exact at matched accuracy: {ours_name} {ours['seconds']:.2f} s "
            f"(rel. error {ours['relative_error']:.1e}) against {name} {peer['seconds']:.2f} s "
            f"(rel. error {peer['relative_error']:.1e}): "
            f"{ours['seconds'] / peer['seconds']:.2f}× (target ≤ 0.5×)")
    tuned = matched_pydvl(results, retained_heap=True)
    if tuned is not None:
        line += (f"; against pyDVL with the same allocator setting ({tuned[0]}, "
                 f"{tuned[1]['seconds']:.2f} s): {ours['seconds'] / tuned[1]['seconds']:.2f}×")
    return line


def _kronecker_check(results: dict[str, dict], verdict: Callable) -> str:
    kron = results.get("kronfluence-ekfac", {}).get("seconds")
    peer = best_kronecker(results, ours=False)
    ours = best_kronecker(results, ours=True, within=kron)
    if not kron or peer is None or ours is None:
        return (f"{verdict(None)} Kronecker: needs kronfluence-ekfac and an influencekit row "
                "within its time")
    (ours_name, o), (peer_name, q) = ours, peer
    ok = o["pearson_flat"] >= q["pearson_flat"] and o["pearson_rows_mean"] >= q[
        "pearson_rows_mean"]
    return (f"{verdict(ok)} Kronecker: best influencekit row within kronfluence's {kron:.2f} s, "
            f"{ours_name} (R all {o['pearson_flat']:.3f}, per query {o['pearson_rows_mean']:.3f},"
            f" {o['seconds']:.2f} s) against the best peer, {peer_name} (R all "
            f"{q['pearson_flat']:.3f}, per query {q['pearson_rows_mean']:.3f}, "
            f"{q['seconds']:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per method")
    parser.add_argument("--methods", nargs="*", help="run only these")
    parser.add_argument("--quick", type=float, default=60.0,
                        help="methods faster than this many seconds run twice, the faster kept")
    parser.add_argument("--reuse", nargs="*", default=[],
                        help="take these methods' results from the previous run in --out")
    parser.add_argument("--problem", default=problem_module.DEFAULT,
                        choices=list(problem_module.PROBLEMS),
                        help="the benchmark problem (its results go to OUT/NAME unless it is "
                             "the default)")
    parser.add_argument("--core", action="store_true",
                        help="only the rows the checks of issue 14 need (compare.CORE)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of the problem instance (0: the README's table)")
    parser.add_argument("--floors-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floors_worker:
        import ours

        torch.set_num_threads(args.threads)
        print(json.dumps(ours.floors(problem_module.load(Path(args.floors_worker)))))
        return
    problem_path = problem_module.prepare(Path(args.out), args.seed, args.problem)
    out = problem_module.results_folder(Path(args.out), args.problem)
    settings = problem_module.built_settings(problem_path)  # the damping it was built with
    python = sys.executable
    floors = _floors(python, problem_path, args.threads)
    floor = floors["per-example gradients, one pass"]
    wanted = args.methods or (CORE if args.core else
                              [m for methods in FAMILIES.values() for m in methods])
    results: dict[str, dict] = {}
    for method in wanted:
        print(f"running {method} ...", flush=True)
        if method in args.reuse:
            results[method] = _reused(out, method)
            continue
        results[method] = _best_of(python, problem_path, method, out, args.threads,
                                   args.timeout, args.quick)
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} "
             f"({platform.processor() or 'cpu'}), {args.threads} threads, torch "
             f"{torch.__version__}; each method in its own process; methods under "
             f"{args.quick:g} s ran twice, the faster run kept.",
             f"Problem {args.problem}: {settings['model']}; {settings['data']}; "
             f"damping {settings['damping']}; "
             f"{settings['num_test']} test points; training seed {args.seed}.",
             "Floors: " + ", ".join(f"{k} {v:.3f} s" for k, v in floors.items()), ""]
    lines += [*_table(results, floor), "", *_checks(results)]
    print("\n".join(lines))
    versions = {r["library"]: r.get("version") for r in results.values() if r.get("library")}
    from influencekit.io import atomic_write_json

    payload = {"benchmark": "compare", "date": time.strftime("%Y-%m-%d"),
               "machine": {"machine": platform.machine(), "processor": platform.processor(),
                           "threads": args.threads},
               "versions": {"torch": torch.__version__, "python": platform.python_version(),
                            **versions},
               "problem": {"name": args.problem, **settings},
               "training": problem_module.training_info(problem_path),
               "floors_seconds": floors, "results": results, "table": lines}
    path = atomic_write_json(out / "compare.json", _finite(json.loads(json.dumps(
        payload, default=str))))
    print(f"\nSaved {path}")


if __name__ == "__main__":
    main()
