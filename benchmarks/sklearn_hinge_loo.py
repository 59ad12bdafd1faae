"""Leave-one-out through ``ik.from_sklearn`` for scikit-learn's hinge-loss SVM at the paper's
scale (Fig. 3): predicted changes (smooth hinge, t = 0.001, at the hinge-trained weights)
against scikit-learn's own refits.

Data as ``influencekit reproduce fig3-hinge``: scikit-learn's digits 1 vs 7, the 252 training
images each kept and joined by jittered copies (n = 252·copies), test images untouched.
``LinearSVC(loss="hinge", fit_intercept=False, C = 1/(n·λ))`` with λ = 0.01 (the paper's), tol
1e-10. For the test points of largest hinge loss, the ``--points`` training points of largest
|predicted change| are removed one at a time and the SVM refitted with C·n/(n−1) (the removed
point takes its share of the regulariser, influencekit's convention).

    .venv/bin/python benchmarks/sklearn_hinge_loo.py --copies 50
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from sklearn.svm import LinearSVC

import influencekit as ik
from influencekit.reproduce.fig3_hinge import augmented_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=50)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--tests", type=int, default=3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    args = parser.parse_args()
    started = time.perf_counter()
    split, _ = augmented_digits(seed=0, copies=args.copies)
    X, y = split.X_train.numpy().astype(np.float64), split.y_train.numpy()
    Xt, yt = split.X_test.numpy().astype(np.float64), split.y_test.numpy()
    n = len(y)
    C = 1.0 / (n * args.weight_decay)
    svm = LinearSVC(loss="hinge", fit_intercept=False, C=C, tol=1e-10, max_iter=1_000_000)
    svm.fit(X, y)
    model, objective, train = ik.from_sklearn(svm, X, y, temperature=0.001)
    inf = ik.Influence(model, objective, train, solver="direct", damping=0.0,
                       stationarity_tol=None).fit()
    features, targets = ik.sklearn_data(svm, Xt, yt)
    with torch.no_grad():
        margins = (2.0 * targets - 1) * model(features)[:, 0]
    rows = torch.argsort(margins)[: args.tests]
    predicted = inf.loo_change((features[rows], targets[rows])).numpy()
    results = []
    for r, j in enumerate(rows.tolist()):
        top = np.argsort(-np.abs(predicted[r]))[: args.points]

        def hinge(estimator, j: int = j) -> float:
            score = float(estimator.decision_function(Xt[j:j + 1])[0])
            return max(0.0, 1.0 - (2.0 * yt[j] - 1.0) * score)

        base = hinge(svm)
        actual = []
        for i in top:
            keep = np.arange(n) != i
            refit = copy.deepcopy(svm).set_params(C=C * n / (n - 1)).fit(X[keep], y[keep])
            actual.append(hinge(refit) - base)
        pearson = float(np.corrcoef(predicted[r][top], actual)[0, 1])
        results.append({"test_index": j, "margin": float(margins[j]), "pearson": pearson})
        print(f"test point {j} (margin {float(margins[j]):+.3f}): Pearson R = {pearson:.4f} "
              f"over {len(top)} refits", flush=True)
    print(json.dumps({"n": n, "C": C, "results": results,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
