"""Run one peer-library method on the cached benchmark problem and save the result.

    python run_one.py --problem PATH --method NAME --out RESULT.pt [--threads 2]

Runs in the benchmark environment (.bench-venv, built by setup-env.sh). The method names are
the keys of METHODS in pydvl_methods, dattri_methods, kronfluence_methods, captum_methods and
../ours.py (the prefix before the first "-" picks the module).

The result file (torch.save of a dict, written atomically) holds: method, library,
version, settings, seconds (time.perf_counter around the method call only), peak_rss_bytes
(VmHWM of the whole process, in bytes; see
../peak_memory.py), peak_rss_before_bytes (the same just before
the call, after loading the problem), process (getrusage of this process over the call only:
user_seconds, system_seconds, minor_page_faults, major_page_faults; system time and page faults
show how much of a run went to fresh memory), relative_error (‖S − R‖_F / ‖R‖_F), pearson_flat,
pearson_rows_mean, pearson_rows_min, num_nonfinite, scores ((m, n) float64, our
I_up,loss) and error (None, or the traceback if the library failed: then scores and the
metrics are None).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: problem.py and the peers package

import torch  # noqa: E402
from peak_memory import peak_rss_bytes  # noqa: E402

from problem import atomic_save  # noqa: E402

MODULES = {"pydvl": "peers.pydvl_methods", "dattri": "peers.dattri_methods",
           "kronfluence": "peers.kronfluence_methods", "captum": "peers.captum_methods",
           "influencekit": "ours"}


def available_methods() -> dict[str, str]:
    """Method name -> module (imports every peer library; for listing only)."""
    names = {}
    for module_name in MODULES.values():
        module = importlib.import_module(module_name)
        names.update({name: module_name for name in module.METHODS})
    return names


def agreement(scores: torch.Tensor, reference: torch.Tensor) -> dict:
    S = scores.to(torch.float64)
    R = reference.to(torch.float64)
    out = {"num_nonfinite": int((~torch.isfinite(S)).sum())}
    out["relative_error"] = float(torch.linalg.norm(S - R) / torch.linalg.norm(R))
    out["pearson_flat"] = _pearson(S.flatten(), R.flatten())
    rows = [_pearson(S[i], R[i]) for i in range(R.shape[0])]
    rows_t = torch.tensor(rows, dtype=torch.float64)
    out["pearson_rows_mean"] = float(rows_t.mean())
    out["pearson_rows_min"] = float(rows_t.min())
    return out


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / (torch.linalg.norm(a) * torch.linalg.norm(b)))


class _Collector(logging.Handler):
    """Keeps the WARNING-and-above log records the libraries emit during the call."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"log {record.name}: {record.getMessage()}"[:500])




def process_usage(before: resource.struct_rusage, after: resource.struct_rusage) -> dict:
    """CPU seconds and page faults of this process between two getrusage readings."""
    return {"user_seconds": after.ru_utime - before.ru_utime,
            "system_seconds": after.ru_stime - before.ru_stime,
            "minor_page_faults": after.ru_minflt - before.ru_minflt,
            "major_page_faults": after.ru_majflt - before.ru_majflt}


def run(problem_path: Path, method: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
    library = method.split("-", 1)[0]
    result = {"method": method, "library": library, "version": None, "settings": None,
              "threads": threads, "problem": str(problem_path), "torch": torch.__version__,
              "seconds": None, "peak_rss_bytes": None, "peak_rss_before_bytes": None,
              "process": None,
              "relative_error": None, "pearson_flat": None, "pearson_rows_mean": None,
              "pearson_rows_min": None, "num_nonfinite": None, "scores": None,
              "warnings": [], "error": None}
    try:
        import problem as problem_module

        if library not in MODULES:
            raise KeyError(f"unknown library prefix {library!r}; expected one of {list(MODULES)}")
        module = importlib.import_module(MODULES[library])
        result["version"] = module.VERSION
        if method not in module.METHODS:
            raise KeyError(f"unknown method {method!r}; {library} offers {list(module.METHODS)}")
        result["settings"] = module.SETTINGS.get(method)
        fn = module.METHODS[method]
        problem = problem_module.load(problem_path)
        # torch.func imports torch._dynamo on its first call (~2.5 s here): a one-off process
        # cost like the libraries' own imports, so it happens for every method before the clock
        importlib.import_module("torch._dynamo")
    except Exception:
        result["error"] = traceback.format_exc()
        return result

    records = _Collector()
    logging.getLogger().addHandler(records)
    result["peak_rss_before_bytes"] = peak_rss_bytes()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = fn(problem)
        result["seconds"] = time.perf_counter() - start
        result["process"] = process_usage(usage, resource.getrusage(resource.RUSAGE_SELF))
    except Exception:
        result["seconds"] = time.perf_counter() - start
        result["peak_rss_bytes"] = peak_rss_bytes()
        result["error"] = traceback.format_exc()
        return result
    finally:
        logging.getLogger().removeHandler(records)
        # the libraries' own messages (e.g. "did not converge"), not deprecation noise
        result["warnings"] = sorted(
            {f"{w.category.__name__}: {w.message}"[:500] for w in caught
             if not issubclass(w.category, (DeprecationWarning, FutureWarning))}
            | set(records.messages))
    result["peak_rss_bytes"] = peak_rss_bytes()
    if hasattr(module, "details"):  # e.g. iterations and residual of influencekit's solves
        result.update(module.details())
    try:
        scores = scores.detach().to(torch.float64).cpu()
        expected = tuple(problem.reference.shape)
        if tuple(scores.shape) != expected:
            raise ValueError(f"scores have shape {tuple(scores.shape)}, expected {expected}")
        result["scores"] = scores
        result.update(agreement(scores, problem.reference))
    except Exception:
        result["error"] = traceback.format_exc()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", type=Path, required=True, help="cached problem-*.pt")
    parser.add_argument("--method", required=True, help="e.g. pydvl-cg-block, dattri-cg")
    parser.add_argument("--out", type=Path, required=True, help="result file (.pt)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    result = run(args.problem, args.method, args.threads)
    atomic_save(result, args.out)
    if result["error"] is None:
        print(f"{args.method}: {result['seconds']:.2f} s, peak RSS "
              f"{result['peak_rss_bytes'] / 2**20:.0f} MiB, rel. error "
              f"{result['relative_error']:.3e}, Pearson flat {result['pearson_flat']:.6f}, "
              f"rows mean {result['pearson_rows_mean']:.6f}")
    else:
        print(f"{args.method}: FAILED\n{result['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
