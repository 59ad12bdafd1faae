"""How often does §5.2's pre-filter miss the training images the paper's rule would choose?

``influencekit reproduce sec52-attack`` ranks training images by pixel ‖I_pert,loss‖₁, but the
pixel gradient costs a backward pass through EfficientNet-Lite0 per image, so it computes it
only for the CANDIDATES (32) images with the largest feature-space ‖I_pert,loss‖₂. This script
computes the pixel norm for all 1,800 training images on a few targets and reports, for k = 1, 2,
10, the overlap of the true top-k with the top-k found among the candidates, and the pixel norm
of the images chosen relative to the true top-k.

    .venv/bin/python benchmarks/sec52_candidates.py --targets 4

(about a minute per target on 2 cores; needs the ``sec52`` extra, which ``make`` installs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from influencekit.reproduce import sec52_attack
from influencekit.reproduce.base import RunSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args()
    start = time.perf_counter()
    setup = sec52_attack.prepare(RunSettings(out=Path(args.out)))
    targets = sec52_attack.choose_targets(setup, args.targets, seed=0)
    everyone = torch.arange(setup.n)
    rows = []
    for target in targets.tolist():
        ranked, _, _ = setup.rank(target)
        wrt = setup.feature_influence(setup.layer, setup.clean, target, everyone)
        pixels = torch.cat([setup.pixel_gradient(setup.train_pixels[s : s + 100],
                                                 wrt[s : s + 100])[0].abs().flatten(1).sum(1)
                            for s in range(0, setup.n, 100)])
        truth = pixels.argsort(descending=True)
        row = {"target": target}
        for k in sec52_attack.ATTACK_SIZES:
            found = set(ranked[:k].tolist())
            row[f"overlap_{k}"] = len(found & set(truth[:k].tolist())) / k
            row[f"l1_ratio_{k}"] = float(pixels[ranked[:k]].sum() / pixels[truth[:k]].sum())
        row["true_top1_rank_in_feature_norm"] = int(
            (wrt.norm(dim=1) > wrt[truth[0]].norm()).sum())
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0] if key != "target"}
    record = {"candidates": sec52_attack.CANDIDATES, "targets": len(rows), "mean": summary,
              "rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "seconds": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sec52_candidates.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record["mean"]))


if __name__ == "__main__":
    main()
