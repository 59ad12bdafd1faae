"""influencekit explain / audit on files the tests write, in every supported format; refusals;
and the HTML report checked in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

import influencekit as ik
from influencekit.cli import main
from influencekit.explain import load_subject
from influencekit.files import UnsafeFileError

import browser

skops_io = pytest.importorskip("skops.io")


def _tabular(folder: Path) -> dict:
    data = load_breast_cancer()
    X, y = data.data[:, :6], data.target
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-10, max_iter=5000))
    pipe.fit(X[:150], y[:150])
    skops_io.dump(pipe, folder / "model.skops")
    names = np.array(data.feature_names[:6])
    np.savez(folder / "train.npz", X=X[:150], y=y[:150], feature_names=names)
    np.savez(folder / "test.npz", X=X[150:250], y=y[150:250], feature_names=names)
    for name, rows in (("train", slice(0, 150)), ("test", slice(150, 250))):
        lines = [",".join([*(n.replace(" ", "_") for n in names), "label"])]
        lines += [",".join([*(f"{v:.17g}" for v in X[k]), str(y[k])])
                  for k in range(len(y))[rows]]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    torch.save({"X": torch.as_tensor(X[:150]), "y": torch.as_tensor(y[:150])},
               folder / "train.pt")
    torch.save({"X": torch.as_tensor(X[150:250]), "y": torch.as_tensor(y[150:250])},
               folder / "test.pt")
    return {"model": folder / "model.skops", "X": X, "y": y}


def _run(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("suffix", ["npz", "csv", "pt"])
def test_explain_tabular_files_give_the_same_scores(tmp_path, suffix):
    files = _tabular(tmp_path)
    out = tmp_path / f"out-{suffix}"
    check = ["--check", 3] if suffix == "npz" else []
    assert _run("explain", "--model", files["model"], "--train", tmp_path / f"train.{suffix}",
                "--test", tmp_path / f"test.{suffix}", "--out", out, *check) == 0
    summary = json.loads((out / "explain.json").read_text())
    if check:  # the pipeline's scaler stays fixed, the logistic regression is refitted
        assert summary["check"]["pearson"] > 0.99
    scores = np.load(out / "scores.npz")
    # the same numbers as the library called directly on the estimator
    pipe = skops_io.load(files["model"])
    model, objective, train = ik.from_sklearn(pipe, files["X"][:150], files["y"][:150])
    test = ik.sklearn_data(pipe, files["X"][150:250], files["y"][150:250])
    inf = ik.Influence(model, objective, train, solver="direct", damping=0.0).fit()
    rows = scores["test_index"]
    expected = inf.loo_change((test[0][rows], test[1][rows])).numpy()
    np.testing.assert_allclose(scores["loo_change"], expected, rtol=1e-9, atol=1e-15)
    # by default: the misclassified test points
    predicted = pipe.predict(files["X"][150:250])
    wrong = np.flatnonzero(predicted != files["y"][150:250])
    assert sorted(rows.tolist()) == sorted(wrong.tolist())[:20]
    assert summary["solver"] == "direct" and "exact Hessian" in summary["solver_reason"]
    first = summary["points"][0]
    assert first["helpful"][0]["loo_change"] >= first["helpful"][-1]["loo_change"] > 0 or \
        first["helpful"][0]["loo_change"] > 0
    assert first["harmful"][0]["loo_change"] <= first["harmful"][-1]["loo_change"]
    assert first["helpful"][0]["features"], "tabular data gets the features that push"


def _image_folder(folder: Path) -> tuple[Path, Path]:
    from PIL import Image

    digits = load_digits()
    keep = np.isin(digits.target, [3, 8])
    images, labels = digits.images[keep][:120], digits.target[keep][:120]
    for part, rows in (("train", range(0, 90)), ("test", range(90, 120))):
        for k in rows:
            target = folder / part / f"digit{labels[k]}"
            target.mkdir(parents=True, exist_ok=True)
            pixels = (images[k] / 16 * 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(target / f"{k:03d}.png")
    return folder / "train", folder / "test"


def test_explain_and_audit_on_an_image_folder_with_a_scikit_learn_model(tmp_path):
    train, test = _image_folder(tmp_path)
    from influencekit.files import load_examples

    examples = load_examples(train)
    assert examples.modality == "image" and examples.images.shape[1:] == (8, 8)
    model = LogisticRegression(C=0.1, max_iter=5000).fit(
        examples.inputs.reshape(len(examples), -1), examples.labels)
    skops_io.dump(model, tmp_path / "digits.skops")
    out = tmp_path / "out"
    assert _run("explain", "--model", tmp_path / "digits.skops", "--train", train, "--test",
                test, "--test-index", 0, 5, "--k", 3, "--check", 4, "--out", out) == 0
    summary = json.loads((out / "explain.json").read_text())
    assert [p["index"] for p in summary["points"]] == [0, 5]
    assert summary["check"]["pearson"] > 0.95
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 * (1 + 3 + 3)
    assert _run("audit", "--model", tmp_path / "digits.skops", "--train", train, "--top", 5,
                "--out", tmp_path / "audit") == 0
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    values = [r["self_influence"] for r in audit["ranked"]]
    assert values == sorted(values) and len(values) == 5


def test_explain_text_lines_with_a_vectorizer_pipeline(tmp_path):
    good = ["great fun film", "a great story", "lovely acting", "fun and lovely", "great cast"]
    bad = ["dull boring film", "a boring story", "awful acting", "dull and awful", "weak cast"]
    lines = [f"pos\t{t}" for t in good] + [f"neg\t{t}" for t in bad] + ["pos\tboring but fun"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("neg\tfun but dull\npos\tgreat and lovely\n")
    texts = [line.split("\t", 1)[1] for line in lines]
    labels = [line.split("\t", 1)[0] for line in lines]
    pipe = make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0, max_iter=5000))
    skops_io.dump(pipe.fit(texts, labels), tmp_path / "text.skops")
    out = tmp_path / "out"
    assert _run("explain", "--model", tmp_path / "text.skops", "--train", tmp_path / "train.txt",
                "--test", tmp_path / "test.txt", "--test-index", 0, 1, "--out", out) == 0
    page = (out / "report.html").read_text()
    assert "fun but dull" in page and "boring but fun" in page


def test_explain_a_torch_export_archive(tmp_path, monkeypatch):
    torch.manual_seed(0)
    X = torch.randn(60, 4)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    ik.training.train_steps(model, ik.CrossEntropyObjective(weight_decay=0.01), (X, y),
                            steps=300, lr=0.05, batch_size=60, seed=0)
    program = torch.export.export(model, (X[:4],),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "model.pt2")
    np.savez(tmp_path / "train.npz", X=X.numpy(), y=y.numpy())
    np.savez(tmp_path / "test.npz", X=X[:10].numpy(), y=1 - y[:10].numpy())
    out = tmp_path / "out"
    assert _run("explain", "--model", tmp_path / "model.pt2", "--train", tmp_path / "train.npz",
                "--test", tmp_path / "test.npz", "--damping", "0.01", "--out", out) == 0
    scores = np.load(out / "scores.npz")
    eager = ik.Influence(model, ik.CrossEntropyObjective(), (X, y), solver="direct",
                         damping=0.01, curvature="gauss-newton", stationarity_tol=None).fit()
    rows = torch.as_tensor(scores["test_index"])
    expected = eager.loo_change((X[:10][rows], (1 - y[:10])[rows])).numpy()
    np.testing.assert_allclose(scores["loo_change"], expected, rtol=1e-4, atol=1e-7)
    # a saved network has no training recipe: --check is refused, before any fit
    import influencekit.explain as explaining

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before refusing --check")

    monkeypatch.setattr(explaining, "_make_influence", no_fit)
    with pytest.raises(ik.InputError, match="--check needs a way to retrain"):
        explaining.explain(load_subject(str(tmp_path / "model.pt2"), str(tmp_path / "train.npz"),
                             str(tmp_path / "test.npz")), tmp_path / "checked", check=3)
    assert not (tmp_path / "checked" / "scores.npz").exists()


def test_explain_a_torchscript_cnn(tmp_path):
    """A TorchScript file is rebuilt as the same eager module (checked on the data): the scores
    equal the eager model's."""
    digits = load_digits()
    keep = np.isin(digits.target, [0, 1, 2])
    X = torch.as_tensor(digits.images[keep][:90] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(digits.target[keep][:90])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    ik.training.train_steps(model, ik.CrossEntropyObjective(weight_decay=0.01), (X, y),
                            steps=200, lr=0.02, batch_size=90, seed=0)
    torch.jit.save(torch.jit.script(model), tmp_path / "cnn.pt")
    torch.save({"X": X[:70], "y": y[:70]}, tmp_path / "train.pt")
    torch.save({"X": X[70:], "y": y[70:]}, tmp_path / "test.pt")
    out = tmp_path / "out"
    assert _run("explain", "--model", tmp_path / "cnn.pt", "--train", tmp_path / "train.pt",
                "--test", tmp_path / "test.pt", "--test-index", 0, 4, "--damping", "0.01",
                "--solver", "direct", "--out", out) == 0
    scores = np.load(out / "scores.npz")
    eager = ik.Influence(model, ik.CrossEntropyObjective(), (X[:70], y[:70]), solver="direct",
                         damping=0.01, curvature="gauss-newton", stationarity_tol=None).fit()
    expected = eager.loo_change((X[70:][[0, 4]], y[70:][[0, 4]])).numpy()
    np.testing.assert_allclose(scores["loo_change"], expected, rtol=1e-4, atol=1e-8)
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 2 * 11


def test_torchscript_with_its_own_forward_is_refused(tmp_path):
    from influencekit.torchscript import UnsupportedTorchScriptError

    class Doubled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return 2 * self.linear(x)

    torch.jit.save(torch.jit.script(Doubled()), tmp_path / "custom.ts")
    np.savez(tmp_path / "train.npz", X=np.zeros((4, 3)), y=np.array([0, 1, 0, 1]))
    with pytest.raises(UnsupportedTorchScriptError, match=r"torch\.export"):
        load_subject(str(tmp_path / "custom.ts"), str(tmp_path / "train.npz"), None)
    torch.save(nn.Linear(3, 2), tmp_path / "pickled.pt")  # torch.save of a module: a pickle
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_subject(str(tmp_path / "pickled.pt"), str(tmp_path / "train.npz"), None)


def test_pickles_are_refused_with_how_to_save_safely(tmp_path):
    files = _tabular(tmp_path)
    estimator = skops_io.load(files["model"])
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(estimator))
    with pytest.raises(UnsafeFileError, match=r"skops\.io\.dump"):
        load_subject(str(tmp_path / "model.pkl"), str(tmp_path / "train.npz"), None)
    assert _run("explain", "--model", tmp_path / "model.pkl", "--train",
                tmp_path / "train.npz") == 2
    # a .pt file holding a pickled object, not tensors
    torch.save({"X": torch.zeros(2, 2), "y": torch.zeros(2), "meta": Path("x")},
               tmp_path / "bad.pt")
    with pytest.raises(UnsafeFileError, match="weights_only"):
        load_subject(str(files["model"]), str(tmp_path / "bad.pt"), None)
    np.savez(tmp_path / "objects.npz", X=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(UnsafeFileError, match="object arrays"):
        load_subject(str(files["model"]), str(tmp_path / "objects.npz"), None)


@pytest.mark.parametrize("case,words", [
    ("format", "Unknown data format"), ("label", "no column"),
    ("columns", "does not fit the pipeline"), ("classes", "not fitted on"),
    ("index", "out of range"), ("model", "Unknown model format"),
])
def test_mismatches_get_clear_errors(tmp_path, case, words):
    files = _tabular(tmp_path)
    model, train, test = files["model"], tmp_path / "train.npz", tmp_path / "test.npz"
    extra: list = []
    if case == "format":
        train = tmp_path / "train.json"
        train.write_text("{}")
    elif case == "label":
        extra = ["--label-column", "target"]
        train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    elif case == "columns":
        np.savez(tmp_path / "narrow.npz", X=files["X"][:150, :3], y=files["y"][:150])
        train = tmp_path / "narrow.npz"
    elif case == "classes":
        np.savez(tmp_path / "relabelled.npz", X=files["X"][:150], y=files["y"][:150] + 5)
        train = tmp_path / "relabelled.npz"
    elif case == "index":
        extra = ["--test-index", "1000"]
    else:
        model = tmp_path / "model.onnx"
        model.write_bytes(b"")
    with pytest.raises(ik.InputError, match=words):
        from influencekit.explain import explain

        subject = load_subject(str(model), str(train), str(test),
                               label_column=extra[1] if case == "label" else None)
        explain(subject, tmp_path / "out", test_index=[1000] if case == "index" else None)


def test_report_in_a_real_browser(tmp_path):
    """Headless Chromium loads the report from disk: no console errors, no network requests,
    a card per explained test point with its helpful and harmful examples, the index sorts by
    loss; the screenshot is the README's."""
    if browser.find_chromium() is None:
        pytest.skip("Chromium is not installed and `make test` could not install it "
                    "(apt-get install chromium needs root and the Debian mirror)")
    train, test = _image_folder(tmp_path)
    from influencekit.files import load_examples

    examples = load_examples(train)
    model = LogisticRegression(C=0.1, max_iter=5000).fit(
        examples.inputs.reshape(len(examples), -1), examples.labels)
    skops_io.dump(model, tmp_path / "digits.skops")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert _run("explain", "--model", tmp_path / "digits.skops", "--train", train,
                    "--test", test, "--test-index", 0, 3, 7, "--k", 4, "--check", 3,
                    "--out", out) == 0
    summary = json.loads((out / "explain.json").read_text())
    losses = sorted(p["loss"] for p in summary["points"])
    sort_by_loss = "document.querySelectorAll('th.sortable')[1].click()"
    visit = browser.visit(out / "report.html", {
        "cards": "Array.from(document.querySelectorAll('.card')).map(c => c.dataset.test)",
        "helpful": "document.querySelectorAll('.card .helpful .example').length",
        "harmful": "document.querySelectorAll('.card .harmful .example').length",
        "images": "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
                  ".length",
        "first_loss": "parseFloat(document.querySelector('#index tbody tr')"
                      ".cells[3].dataset.value)",
    }, actions=[sort_by_loss, sort_by_loss])  # descending, then ascending
    assert visit.errors == []
    assert all(url.startswith(("file:", "data:")) for url in visit.requests), visit.requests
    assert sorted(visit.values["cards"]) == ["0", "3", "7"]
    assert visit.values["helpful"] == 3 * 4 and visit.values["harmful"] == 3 * 4
    assert visit.values["images"] == 3 * (1 + 4 + 4)
    assert visit.values["first_loss"] == pytest.approx(losses[0])
    assert visit.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "report.png").write_bytes(visit.screenshot)  # docs/report.png is one of these


SETUP_MODULE = '''
import torch
import influencekit as ik
from torch import nn

torch.manual_seed(0)
X = torch.randn(50, 3, dtype=torch.float64)
y = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) > 0).long()


def train(indices):
    model = nn.Linear(3, 2, dtype=torch.float64)
    ik.training.minimize(model, ik.CrossEntropyObjective(weight_decay=0.05),
                         (X[indices], y[indices]), tol=1e-12)
    return model


def setup():
    return {"model": train(torch.arange(50)),
            "objective": ik.CrossEntropyObjective(weight_decay=0.05),
            "train": (X, y), "test": (X[:8], 1 - y[:8]), "class_names": ["no", "yes"],
            "feature_names": ["a", "b", "c"],
            "retrain": lambda keep: train(torch.as_tensor(keep))}
'''


def test_explain_and_audit_with_setup_and_retraining(tmp_path, monkeypatch):
    """--setup module:function; --check retrains with its 'retrain'. A convex model, refit
    exactly: the removal convention makes the predicted and actual changes agree closely."""
    (tmp_path / "my_setup.py").write_text(SETUP_MODULE)
    monkeypatch.chdir(tmp_path)
    assert _run("explain", "--setup", "my_setup:setup", "--curvature", "hessian", "--damping",
                "0", "--test-index", 0, 1, "--check", 5, "--out", tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert summary["check"]["pearson"] > 0.99
    assert summary["points"][0]["label"] in ("no", "yes")
    assert summary["points"][0]["helpful"][0]["features"][0][0] in ("a", "b", "c")
    assert _run("audit", "--setup", "my_setup:setup", "--curvature", "hessian", "--damping",
                "0", "--top", 4, "--out", tmp_path / "audit") == 0
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    scores = np.load(tmp_path / "audit" / "self_influence.npz")["self_influence"]
    assert [r["index"] for r in audit["ranked"]] == np.argsort(scores)[:4].tolist()


def test_audit_on_a_csv_finds_flipped_labels(tmp_path):
    """The paper's §5.4 on a table: flip 10% of the labels; the top of the self-influence
    ranking holds far more flipped points than chance."""
    data = load_breast_cancer()
    X, y = data.data[:200, :6], data.target[:200].copy()
    flipped = np.random.default_rng(0).choice(200, 20, replace=False)
    y[flipped] = 1 - y[flipped]
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, tol=1e-10, max_iter=5000))
    skops_io.dump(pipe.fit(X, y), tmp_path / "model.skops")
    header = ",".join([*(f"f{k}" for k in range(6)), "label"])
    rows = [",".join([*(f"{v:.17g}" for v in X[k]), str(y[k])]) for k in range(200)]
    (tmp_path / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    assert _run("audit", "--model", tmp_path / "model.skops", "--train", tmp_path / "train.csv",
                "--top", 20, "--out", tmp_path / "audit") == 0
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    found = len(set(r["index"] for r in audit["ranked"]) & set(flipped.tolist()))
    assert found >= 8  # chance: 2 of 20
