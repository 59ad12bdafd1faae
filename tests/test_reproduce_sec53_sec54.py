"""§5.3 (domain mismatch) and §5.4 (mislabelled data): quick variants, loaders, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import influencekit as ik
from influencekit import reproduce
from influencekit.cli import main
from influencekit.datasets.readmission import (
    AGE_BUCKETS,
    CHILD_FEATURE,
    NUMERIC_COLUMNS,
    UCI_COLUMNS,
    encode,
    generate_readmission_table,
    read_diabetic_csv,
    write_diabetic_csv,
)
from influencekit.datasets.spam import enron_spam, generate_spam_corpus, read_enron_folder
from influencekit.errors import InputError
from influencekit.reproduce.runner import run_experiment
from influencekit.reproduce.sec53_domain_mismatch import influence_ratios, keep_few_children
from influencekit.reproduce.sec54_mislabel import (
    FRACTIONS,
    LogisticFit,
    area_under_curve,
    check_orders,
    flip_labels,
    flips_found,
)
from influencekit.training import minimize

# ---------------------------------------------------------------------------------- §5.3


def test_sec53_quick_reaches_the_paper_conclusions(tmp_path: Path) -> None:
    record = run_experiment(reproduce.get("sec53-domain-mismatch"), tmp_path, quick=True)
    m = record.outcome.metrics
    # the 4 kept children are by far the most influential training points on the child test
    # patients whose prediction changed, one by one and for their summed loss
    assert m["n_test_children_changed"] > 0
    assert m["influence_ratio_children_vs_rest"] >= 5.0
    assert m["influence_ratio_group"] >= 5.0
    # I_pert points at the age indicator, although other features have larger weights
    assert m["top_feature_is_age_child"] == 1.0
    assert m["n_features_larger_weight"] > 0
    # the mismatch itself: the child weight changes sign and child predictions get worse
    assert m["age_child_weight_original"] < 0.0 < m["age_child_weight"]
    assert m["test_children_accuracy_modified"] < m["test_children_accuracy_original"]
    assert m["train_gradient_norm"] < 1e-8
    assert (tmp_path / "sec53-domain-mismatch" / "sec53_domain_mismatch.png").stat().st_size > 0


def test_influence_ratio_is_smallest_child_over_largest_other() -> None:
    scores = np.array([[5.0, -40.0, 1.0, 30.0, -2.0],
                       [0.5, 4.0, -8.0, 2.0, 1.0]])
    ratios = influence_ratios(scores, np.array([1, 3]))
    assert ratios == pytest.approx([30.0 / 5.0, 2.0 / 8.0])


def test_keep_few_children_keeps_three_readmitted_and_one_other() -> None:
    child = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    y = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0])
    train, test = np.arange(8), np.array([8, 9])
    split = keep_few_children(train, test, child, y)
    assert split.kept_children.tolist() == [0, 3, 5, 1] and split.moved_to_train == 0
    assert sorted(split.modified.tolist()) == [0, 1, 3, 5, 6, 7]
    # too few readmitted children in training: one is moved from the test set
    split = keep_few_children(np.array([0, 1, 2, 6, 7]), np.array([3, 8, 9]), child, y)
    assert split.moved_to_train == 2 and split.test.tolist() == [9]
    with pytest.raises(InputError, match="needs 3 and 1"):
        keep_few_children(np.array([1, 2, 6]), np.array([9]), child, y)


def test_encoding_follows_the_authors_preprocessing() -> None:
    table = generate_readmission_table(3000, seed=1)
    data = encode(table)
    names = data.feature_names
    assert data.X.shape == (3000, 127)  # the paper's 127 features when every category occurs
    assert names[:8] == list(NUMERIC_COLUMNS)
    assert [f"age_{b}" for b in AGE_BUCKETS] == [n for n in names if n.startswith("age_")]
    # exactly two categories: only the second indicator (pandas get_dummies drop_first)
    assert "change_No" in names and "change_Ch" not in names
    assert "diabetesMed_Yes" in names and "diabetesMed_No" not in names
    # one category only (examide is always "No"): kept, as a constant column
    assert np.all(data.X[:, names.index("examide_No")] == 1.0)
    discharge = [n for n in names if n.startswith("discharge_disposition_id_")]
    assert len(discharge) == 26
    assert discharge == sorted(discharge, key=lambda n: int(n.rsplit("_", 1)[1]))
    ages = data.X[:, [names.index(f"age_{b}") for b in AGE_BUCKETS]]
    assert np.all(ages.sum(axis=1) == 1.0)
    assert np.array_equal(data.y, (table.columns["readmitted"] == "<30").astype(np.int64))
    assert 0.08 < data.y.mean() < 0.15  # about 11% readmitted within 30 days, as in the file


def test_generated_table_has_readmitted_children() -> None:
    data = encode(generate_readmission_table(50_000, seed=5))
    child = data.X[:, data.feature_index(CHILD_FEATURE)] == 1
    assert 40 <= child.sum() <= 130  # 0.16% of the rows
    assert data.y[child].sum() >= 4 and data.y[child].mean() < data.y.mean()


def test_diabetic_csv_round_trip(tmp_path: Path) -> None:
    table = generate_readmission_table(400, seed=2, child_share=0.05)
    path = write_diabetic_csv(table, tmp_path / "diabetic_data.csv")
    assert path.read_text().splitlines()[0].split(",") == list(UCI_COLUMNS)
    original, read = encode(table), encode(read_diabetic_csv(path))
    assert read.feature_names == original.feature_names
    assert np.array_equal(read.X, original.X) and np.array_equal(read.y, original.y)
    assert "UCI diabetic_data.csv from" in read.source


def _handwritten_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    table = {name: [row.get(name, "No") for row in rows] for name in reversed(UCI_COLUMNS)}
    lines = [",".join(["extra_column", *table])]
    for index in range(len(rows)):
        lines.append(",".join(["x", *(table[name][index] for name in table)]))
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reader_accepts_columns_in_any_order_and_extra_columns(tmp_path: Path) -> None:
    numbers = dict.fromkeys(NUMERIC_COLUMNS, "2")
    rows = [{**numbers, "race": "?", "gender": "Male", "age": "[0-10)", "A1Cresult": "None",
             "max_glu_serum": "None", "discharge_disposition_id": "11", "readmitted": "<30",
             "time_in_hospital": "7"},
            {**numbers, "race": "Asian", "gender": "Female", "age": "[70-80)",
             "A1Cresult": ">8", "max_glu_serum": "None", "discharge_disposition_id": "3",
             "readmitted": ">30", "insulin": "Up"},
            {**numbers, "race": "Caucasian", "gender": "Female", "age": "[40-50)",
             "A1Cresult": ">8", "max_glu_serum": "Norm", "discharge_disposition_id": "3",
             "readmitted": "NO"}]
    data = encode(read_diabetic_csv(_handwritten_csv(tmp_path / "d.csv", rows)))
    x = dict(zip(data.feature_names, data.X[0], strict=True))
    assert x["time_in_hospital"] == 7.0 and x["number_inpatient"] == 2.0
    assert x["race_?"] == 1.0 and x["race_Asian"] == 0.0 and x[CHILD_FEATURE] == 1.0
    assert x["gender_Male"] == 1.0 and "gender_Female" not in x  # two categories: second kept
    # ids sort as numbers (3 < 11), so the kept indicator of the two is "11"
    assert x["discharge_disposition_id_11"] == 1.0 and "discharge_disposition_id_3" not in x
    assert x["insulin_Up"] == 0.0 and "insulin_No" not in x
    assert data.y.tolist() == [1, 0, 0]


@pytest.mark.parametrize(("content", "message"), [
    ("", "is empty"),
    ("id,mapping\n1,Emergency\n", r"does not look like UCI diabetic_data.csv: its header lacks"),
    (",".join(UCI_COLUMNS) + "\n", "has a header but no data lines"),
])
def test_reader_explains_bad_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "diabetic_data.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_diabetic_csv(path)


def test_reader_names_the_bad_line_and_column(tmp_path: Path) -> None:
    numbers = dict.fromkeys(NUMERIC_COLUMNS, "1")
    good = {**numbers, "age": "[50-60)", "readmitted": "NO"}
    path = _handwritten_csv(tmp_path / "a.csv", [good, {**good, "num_medications": "many"}])
    with pytest.raises(InputError, match=r"line 3, column 'num_medications': expected a whole"):
        read_diabetic_csv(path)
    path = _handwritten_csv(tmp_path / "b.csv", [good, {**good, "readmitted": "YES"}])
    with pytest.raises(InputError, match=r"expected one of \['NO', '<30', '>30'\], got 'YES'"):
        read_diabetic_csv(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, "1,2,3"]) + "\n")
    with pytest.raises(InputError, match="line 4: 3 fields, but the header has"):
        read_diabetic_csv(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_diabetic_csv(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="is a folder"):
        read_diabetic_csv(tmp_path)


def test_sec53_runs_on_a_csv_given_with_data(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    table = generate_readmission_table(6000, seed=3, child_share=0.02)
    path = write_diabetic_csv(table, tmp_path / "diabetic_data.csv")
    results = _reproduce_from_file("sec53-domain-mismatch", path, "UCI diabetic_data.csv from",
                                   tmp_path, capsys)
    per_class = int(0.9 * encode(table).y.sum())  # a small file: 90% of the rarer label
    kept = results["n_train"] - (2 * per_class - results["children_in_balanced_train"])
    assert kept == 4  # all children but 3 readmitted and 1 other were removed


def test_sec53_cli_explains_a_wrong_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "IDs_mapping.csv"
    path.write_text("admission_type_id,description\n1,Emergency\n")
    code = main(["reproduce", "sec53-domain-mismatch", "--quick", "--out", str(tmp_path / "out"),
                 "--data", str(path)])
    assert code == 2
    assert "does not look like UCI diabetic_data.csv" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- §5.4


def test_sec54_quick_self_influence_finds_flips_first(tmp_path: Path) -> None:
    record = run_experiment(reproduce.get("sec54-mislabel"), tmp_path, quick=True)
    m = record.outcome.metrics
    assert m["n_seeds"] >= 10
    for fraction in FRACTIONS:
        at = f"{round(100 * fraction)}pct"
        influence = m[f"flips_found_at_{at}_influence"]
        assert influence > m[f"flips_found_at_{at}_loss"] > m[f"flips_found_at_{at}_random"]
        assert m[f"flips_found_at_{at}_random"] == pytest.approx(fraction, abs=0.06)
    assert m["min_gap_influence_vs_loss"] > 0.0 and m["min_gap_influence_vs_random"] > 0.0
    assert m["auc_influence"] > m["auc_loss"] > m["auc_random"]
    # fixing what self-influence points at recovers test accuracy fastest
    assert m["test_accuracy_noisy"] < m["test_accuracy_at_30pct_influence"] \
        <= m["test_accuracy_clean"] + 0.01
    assert m["test_accuracy_at_30pct_influence"] > m["test_accuracy_at_30pct_random"]
    assert m["max_solve_residual"] < 1e-8 and m["max_train_gradient_norm"] < 1e-8
    assert (tmp_path / "sec54-mislabel" / "fig6_mislabel.png").stat().st_size > 0


def test_flip_curves_and_orders() -> None:
    flipped = torch.tensor([False, True, False, True, False])
    assert flips_found(torch.tensor([1, 3, 0, 2, 4]), flipped).tolist() == \
        [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    perfect = flips_found(torch.tensor([1, 3, 0, 2, 4]), flipped)
    assert area_under_curve(perfect) == pytest.approx(1.0 - 0.4 / 2)  # 1 − (flipped share)/2
    orders = check_orders(torch.tensor([-0.1, -3.0, 0.0, -2.0, -0.5]),
                          torch.tensor([0.2, 0.1, 3.0, 0.3, 0.0]), np.random.default_rng(0))
    assert orders["influence"].tolist() == [1, 3, 4, 0, 2]  # most negative self-influence first
    assert orders["loss"].tolist() == [2, 3, 0, 1, 4]
    assert sorted(orders["random"].tolist()) == [0, 1, 2, 3, 4]
    y = torch.tensor([0, 1] * 10)
    noisy, mask = flip_labels(y, 0.1, np.random.default_rng(1))
    assert int(mask.sum()) == 2 and torch.equal(noisy[mask], 1 - y[mask])
    assert torch.equal(noisy[~mask], y[~mask])


def test_logistic_fit_minimises_the_library_objective() -> None:
    data = generate_spam_corpus(n_train=120, n_test=10, vocabulary=60, seed=4)
    X, y = data.train
    fitter = LogisticFit(X, 1e-3)
    theta = fitter.fit(y)
    assert fitter.gradient_norm <= 1e-10
    model = torch.nn.Linear(X.shape[1], 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    minimize(model, ik.BinaryLogisticObjective(weight_decay=1e-3), (X, y), tol=1e-10)
    assert torch.allclose(theta, model.weight.detach()[0], atol=1e-6)
    flipped = y.clone()
    flipped[:5] = 1 - flipped[:5]
    refit = fitter.fit(flipped, theta, tol=1e-10)  # warm start with the kept preconditioner
    minimize(model, ik.BinaryLogisticObjective(weight_decay=1e-3), (X, flipped), tol=1e-10)
    assert torch.allclose(refit, model.weight.detach()[0], atol=1e-6)


_HAM = ["meeting", "schedule", "gas", "pipeline", "contract", "enron", "deal", "price",
        "volume", "forecast", "report", "team", "conference", "call", "review", "attached"]
_SPAM = ["free", "offer", "money", "click", "viagra", "cheap", "pills", "win", "prize",
         "casino", "loan", "mortgage", "rates", "unsubscribe", "limited", "bonus"]


def _write_enron(folder: Path, n_ham: int, n_spam: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, words, count in (("ham", _HAM, n_ham), ("spam", _SPAM, n_spam)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            text = " ".join(rng.choice([*words, "the", "and", "of"], size=rng.integers(5, 30)))
            body = f"Subject: {words[k % len(words)]}\r\n{text}\r\n".encode("latin-1")
            (folder / name / f"{k:04d}.{name}.txt").write_bytes(body + b" caf\xe9\n")
    return folder


def test_enron_loader_reads_one_part_or_several(tmp_path: Path) -> None:
    _write_enron(tmp_path / "enron1", 30, 15)
    (tmp_path / "enron1" / "ham" / ".DS_Store").write_bytes(b"\x00\x01")
    texts, labels = read_enron_folder(tmp_path / "enron1")
    assert len(texts) == 45 and labels.sum() == 15 and "café" in texts[0]
    data = enron_spam(tmp_path / "enron1", seed=0)
    assert data.X_train.shape[0] == 36 and data.X_test.shape[0] == 9
    assert data.X_train.shape[1] == len(data.vocabulary) == data.X_test.shape[1]
    assert "the" not in data.vocabulary and "viagra" in data.vocabulary  # stop words removed
    assert data.X_train.dtype == torch.float64 and set(data.y_train.tolist()) == {0, 1}
    spam_rows = data.X_train[data.y_train == 1]
    assert float(spam_rows[:, data.vocabulary.index("meeting")].sum()) == 0.0
    _write_enron(tmp_path / "enron2", 10, 10, seed=1)
    both = enron_spam(tmp_path, seed=0)
    assert both.X_train.shape[0] + both.X_test.shape[0] == 65
    assert "Enron-spam e-mails from" in both.name


def test_enron_loader_explains_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ham/ and spam/ subfolders"):
        enron_spam(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="is a file"):
        enron_spam(tmp_path / "notes.txt")
    (tmp_path / "emails").mkdir()
    with pytest.raises(InputError, match="has no ham/ or spam/ subfolder"):
        enron_spam(tmp_path / "emails")
    _write_enron(tmp_path / "onlyham", 12, 0)
    with pytest.raises(InputError, match="found 12 ham and 0 spam e-mails"):
        enron_spam(tmp_path / "onlyham")
    _write_enron(tmp_path / "tiny", 3, 2)
    with pytest.raises(InputError, match="only 5 e-mails"):
        enron_spam(tmp_path / "tiny")


def test_sec54_runs_on_an_enron_folder_given_with_data(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    folder = _write_enron(tmp_path / "enron1", 40, 20)
    results = _reproduce_from_file("sec54-mislabel", folder, "Enron-spam e-mails from", tmp_path,
                                   capsys)
    assert results["n_train"] == 48 and results["n_flips"] == 5


def _reproduce_from_file(name: str, data: Path, announced: str, tmp_path: Path,
                         capsys: pytest.CaptureFixture) -> dict:
    """Run ``reproduce NAME --quick --data DATA`` by the CLI; check it says which data it read and
    writes every key; return its results."""
    code = main(["reproduce", name, "--quick", "--out", str(tmp_path / "out"), "--data",
                 str(data)])
    assert code == 0
    assert announced in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / name / "results.json").read_text())
    assert set(reproduce.get(name).keys) <= set(results)
    return results
