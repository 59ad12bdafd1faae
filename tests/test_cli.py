"""The command line: the demo end to end, version, argument errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from influencekit import __version__
from influencekit.cli import main


def test_demo_writes_figures_and_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--num-check", "12", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Pearson R = " in printed and str(out / "training_images.png") in printed
    for name in ("training_images.png", "predicted_vs_actual.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results["predicted_label"] != results["true_label"]
    assert results["pearson"] >= 0.99 and results["num_checked"] == 12
    assert len(results["helpful"]) == 5 and not set(results["helpful"]) & set(results["harmful"])
    assert not list(out.glob(".*.tmp"))


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and __version__ in capsys.readouterr().out


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--num-check", "1"])
    assert stop.value.code == 2
    assert "must be an integer ≥ 2" in capsys.readouterr().err
