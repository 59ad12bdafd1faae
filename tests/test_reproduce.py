"""The reproduction framework, the MNIST loader, and fig2-logreg's conclusions (quick variant)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from influencekit import reproduce
from influencekit.cli import main
from influencekit.datasets import mnist, read_idx
from influencekit.reproduce.base import Experiment, Outcome, RunSettings
from influencekit.reproduce.runner import format_number, run_all, run_experiment


def _toy(settings: RunSettings) -> Outcome:
    return Outcome(metrics={"a": 1.0, "b": 0.25 + settings.seed}, data="toy data",
                   notes=["differs"])


TOY = Experiment(name="toy", title="a toy", keys=("a", "b"), paper={"a": "1"}, run=_toy)


def test_runner_writes_flat_numeric_results_and_about(tmp_path: Path) -> None:
    record = run_experiment(TOY, tmp_path, seed=2, quick=True)
    results = json.loads((tmp_path / "toy" / "results.json").read_text())
    assert results["a"] == 1.0 and results["b"] == 2.25 and results["quick"] == 1.0
    assert all(isinstance(v, int | float) for v in results.values())
    about = json.loads((tmp_path / "toy" / "about.json").read_text())
    assert about["data"] == "toy data" and about["paper"] == {"a": "1"}
    assert record.seconds >= 0


def test_missing_keys_are_an_error(tmp_path: Path) -> None:
    broken = Experiment(name="broken", title="", keys=("a", "c"), paper={}, run=_toy)
    with pytest.raises(RuntimeError, match=r"did not produce \['c'\]"):
        run_experiment(broken, tmp_path)


def test_run_all_writes_a_summary_table(tmp_path: Path) -> None:
    run_all([TOY], tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "| toy | `a` | 1 | 1 | toy data |" in summary
    assert "| | `b` | 0.2500 | – |" in summary.replace("|  |", "| |")
    assert "**toy**: differs" in summary


def test_format_number() -> None:
    assert [format_number(v) for v in (3.0, 0.98765, 1.5e-5, 123.45)] == \
        ["3", "0.9877", "1.50e-05", "123.5"]


def test_every_experiment_is_registered_under_its_own_name() -> None:
    found = reproduce.experiments()
    assert "fig2-logreg" in found
    for name, experiment in found.items():
        assert experiment.name == name and experiment.keys
    with pytest.raises(ValueError, match="Unknown experiment 'fig9'"):
        reproduce.get("fig9")


def _write_idx(path: Path, array: np.ndarray, type_byte: int = 0x08) -> None:
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _write_mnist(folder: Path, n_train: int = 40, n_test: int = 12) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        images[np.arange(n), labels + 5, 10:18] = 255  # a class-dependent stroke
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


def test_mnist_loader_reads_idx_files(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    split = mnist(tmp_path, classes=(1, 7))
    assert split.X_train.shape == (8, 784) and set(split.y_train.tolist()) == {0, 1}
    assert float(split.X_train.max()) == 1.0 and float(split.X_train.min()) >= 0.0
    assert "MNIST" in split.name and "1 vs 7" in split.name


def test_mnist_loader_explains_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        mnist(tmp_path)
    _write_idx(tmp_path / "short", np.zeros((3, 4)))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_fig2_logreg_quick_reaches_the_paper_conclusion(tmp_path: Path) -> None:
    record = run_experiment(reproduce.get("fig2-logreg"), tmp_path, quick=True)
    metrics = record.outcome.metrics
    assert metrics["pearson_cg"] >= 0.99 and metrics["spearman_cg"] >= 0.95
    assert metrics["pearson_lissa"] >= 0.98
    assert (tmp_path / "fig2-logreg" / "fig2_logreg.png").exists()


def test_fig2_logreg_runs_on_mnist_files_given_with_data(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    _write_mnist(tmp_path / "mnist", n_train=60, n_test=20)
    code = main(["reproduce", "fig2-logreg", "--quick", "--out", str(tmp_path / "out"),
                 "--data", str(tmp_path / "mnist")])
    assert code == 0
    assert "MNIST from" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "fig2-logreg" / "results.json").read_text())
    assert results["n_points"] == 30


def test_reproduce_cli_rejects_unknown_names(capsys: pytest.CaptureFixture) -> None:
    assert main(["reproduce", "fig9"]) == 2
    assert "Unknown experiment 'fig9'" in capsys.readouterr().err


def test_non_finite_metrics_are_written_as_null(tmp_path: Path) -> None:
    def nan_run(settings: RunSettings) -> Outcome:
        return Outcome(metrics={"a": float("nan"), "b": 1.0}, data="toy")

    run_experiment(Experiment(name="nan", title="", keys=("a", "b"), paper={}, run=nan_run),
                   tmp_path)
    assert json.loads((tmp_path / "nan" / "results.json").read_text())["a"] is None


def test_hardest_misclassified_understands_signed_labels() -> None:
    import torch
    from torch import nn

    import influencekit as ik
    from influencekit.reproduce.common import hardest_misclassified

    model = nn.Linear(1, 1, bias=False).double()
    nn.init.ones_(model.weight)
    X = torch.tensor([[-2.0], [0.1], [-0.5]], dtype=torch.float64)
    for labels in (torch.tensor([-1, 1, 1]), torch.tensor([0, 1, 1])):
        assert hardest_misclassified(model, ik.BinaryLogisticObjective(), X, labels) == 2
