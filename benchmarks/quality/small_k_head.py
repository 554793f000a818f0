"""Why the BBC head with an intercept scored low at 1-2% budgets: a diagnostic of the training recipe.

    python benchmarks/quality/small_k_head.py      # after run.py (reuses its cached stores and features)

For the main variants at 1 / 2 / 5% it redoes the study's selections (same settings, seeds and
targets as bbc.py) and reports, per cell (mean over seeds):

- intercept: the study's first head (logistic regression, C = 10, with an intercept);
- majority share: the share of the 400 test predictions of that head that go to the selection's
  most frequent pool label (the test set has 16-25% per topic);
- recipe: the study's head now (``bbc.train_and_score``: the same without intercept), as in results.json;
- centroid: nearest class centroid (cosine) of the selected rows' features.
All four are applied to every method alike; "recipe" is the study's number. Prints markdown.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
for path in (HERE.parents[1] / "python", HERE.parents[1], HERE):
    sys.path.insert(0, str(path))

import numpy as np  # noqa: E402

import bbc  # noqa: E402
from study import select_accepts, select_budget, variant_table  # noqa: E402

SHOWN = ("gtp joint", "gtp per-example", "topk per-example", "random")


def head_report(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, c: float) -> dict:
    """For one selection: accuracy of the head with an intercept and its share of test predictions
    in the picks' most frequent class, the recipe's accuracy, nearest-centroid accuracy."""
    from sklearn.linear_model import LogisticRegression

    classes, counts = np.unique(y, return_counts=True)
    if len(classes) == 1:
        acc = float(np.mean(test_y == classes[0]))
        return {"intercept": acc, "majority_share": 1.0, "recipe": acc, "centroid": acc}
    predicted = LogisticRegression(C=c, max_iter=2000).fit(x, y).predict(test_x)
    centroids = np.stack([x[y == k].mean(axis=0) for k in classes])
    nearest = classes[np.argmax(test_x @ centroids.T, axis=1)]
    return {"intercept": float(np.mean(predicted == test_y)),
            "majority_share": float(np.mean(predicted == classes[np.argmax(counts)])),
            "recipe": bbc.train_and_score(x, y, test_x, test_y, c), "centroid": float(np.mean(nearest == test_y))}


def main() -> int:
    from gtp_kernels import METHODS as REGISTRY

    s = bbc.FULL
    cache = HERE / ".cache" / "full" / "bbc"
    feature_file = cache / f"features_{s.feature_max_length}.npz"
    if not feature_file.exists():
        raise SystemExit(f"{feature_file} is missing: run benchmarks/quality/run.py --tasks bbc first")
    data = bbc.build_pools(s)
    label_id = {t: i for i, t in enumerate(data["topics"])}
    collected = bbc.collect(s, data, cache, {}, False)
    matrix, target_rows, store = collected["matrix"], collected["targets"], collected["store"]
    feats = np.load(feature_file)["x"]
    n_rows = len(data["rows"])
    row_x, test_x = feats[:n_rows], feats[n_rows:]
    row_y = np.asarray([label_id[r["label"]] for r in data["rows"]])
    test_y = np.asarray([label_id[a["label"]] for a in data["test"]])
    variants = variant_table(select_accepts("targets"))

    def target_for(seed: int, mode: str) -> np.ndarray:
        rows = target_rows[seed * s.targets : (seed + 1) * s.targets]
        return rows.mean(axis=0) if mode == "mean" else np.ascontiguousarray(rows.T)

    print("| pool | variant | budget | intercept | majority share | recipe (no intercept) | centroid | "
          "picks per topic (seed 0) |")
    print("|---|---|---|---|---|---|---|---|")
    for pool_name, index in data["pools"].items():
        pool_matrix = matrix[index]
        for name in SHOWN:
            v = variants[name]
            for pct in (1, 2, 5):
                budget = bbc.budget_rows(pct, len(index))
                reports, counts = [], None
                for seed in s.seeds:
                    picked = select_budget(pool_matrix, target_for(seed, v.mode), budget, v.method,
                                           store_weights=lambda m: store.weights_for(REGISTRY[m].block_scale_invariant),
                                           num_checkpoints=store.t, seed=seed, align_threshold=v.align, fill=v.fill,
                                           joint=v.mode == "joint", topk_reduce=v.topk_reduce, screen=v.screen)
                    rows = index[picked.indices]
                    reports.append(head_report(row_x[rows], row_y[rows], test_x, test_y, s.head_c))
                    if counts is None:
                        counts = np.bincount(row_y[rows], minlength=len(label_id)).tolist()
                mean = {key: 100 * np.mean([r[key] for r in reports]) for key in reports[0]}
                print(f"| {pool_name} | {name} | {pct}% (k={budget}) | {mean['intercept']:.1f} | "
                      f"{mean['majority_share']:.0f}% | {mean['recipe']:.1f} | {mean['centroid']:.1f} | {counts} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
