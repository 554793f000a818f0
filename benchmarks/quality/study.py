"""What both tasks of the quality study share: selection through ``gtp_kernels.select`` at a total
budget, the redundancy counts, residual-against-k curves, timings and figures."""
from __future__ import annotations

import inspect
import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

import gtp_kernels as gk
from gtp_kernels.atomic import atomic_write_text, write_atomically

METHODS = ("gtp", "gtp-cosamp", "topk", "random")
# candidate-screen factors (``select(..., screen=f)``) the study tries; the factor it recommends is
# chosen on the synthetic noise model (noise_model.py choose_screen_factor), not on task A or B
SCREEN_FACTORS = (1.5, 2.0, 3.0)


def select_accepts(option: str) -> bool:
    """Whether this gtp_kernels' ``select`` takes ``option`` (the budget fill lands on branch budgets)."""
    return option in inspect.signature(gk.select).parameters


@dataclass
class Picked:
    """One selection at a total budget: rows in pick order, their weights, the seconds it took."""

    indices: np.ndarray
    weights: np.ndarray
    seconds: float
    info: Dict[str, Any] = field(default_factory=dict)


def round_robin(per_column: Sequence[np.ndarray], budget: int) -> np.ndarray:
    """Union of several columns' picks, taken rank by rank (every column's first pick, then every
    column's second, ...), first occurrences only, cut at ``budget`` rows."""
    seen: Dict[int, None] = {}
    depth = max((len(p) for p in per_column), default=0)
    for rank in range(depth):
        for picks in per_column:
            if rank < len(picks):
                seen.setdefault(int(picks[rank]), None)
                if len(seen) == budget:
                    return np.fromiter(seen, dtype=np.int64)
    return np.fromiter(seen, dtype=np.int64, count=len(seen))


def budget_rows(pct: float, n: int) -> int:
    """Rows in a budget of ``pct`` percent of an ``n``-row pool (at least one)."""
    return max(1, round(pct * n / 100))


def train_and_score(features: np.ndarray, labels: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, c: float,
                    sample_weight: Optional[np.ndarray] = None, max_iter: int = 2000) -> float:
    """Test accuracy of the study's classification head (a multinomial logistic regression,
    scikit-learn L-BFGS, C = ``c``, no intercept) trained on (features, labels); one class:
    predict it. Tasks A (BBC) and C (synthetic) train it on the selected rows. sklearn's
    ConvergenceWarning (a few separable rows at C = 10) is silenced.

    No intercept: an unpenalised intercept learns the class frequencies of the training rows as a
    prior, and for a selection of a few rows those are an artefact of the budget (6 rows over 5
    topics: one topic twice, a log-odds of log 2 = 0.69), while C bounds the weights so that
    w.x varies by ~0.3 across test articles: at 1% of the noisy pool the head then sent 61-84% of
    the test set (its share: 16-25%) to the picks' most frequent topic (small_k_head.py). On the full pools the intercept changes
    accuracy by < 1 point; the test set is balanced (16-25% per topic)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if len(set(labels.tolist())) == 1:
        return float(np.mean(test_y == labels[0]))
    head = LogisticRegression(C=c, max_iter=max_iter, fit_intercept=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        head.fit(features, labels, sample_weight=sample_weight)
    return float(np.mean(head.predict(test_x) == test_y))


def select_budget(matrix: np.ndarray, target: np.ndarray, budget: int, method: str, *, store_weights,
                  seed: int, num_checkpoints: int, align_threshold: Optional[float] = None,
                  fill: Optional[str] = None, joint: bool = False, topk_reduce: Optional[str] = None,
                  screen: Optional[float] = None) -> Picked:
    """``budget`` rows by ``method`` for a (D,) target or a (D, m) target (one column per target
    example).

    Per-column (``joint=False``): ``select`` holds k per column, so with m columns each is asked
    for ceil(budget / m) rows and the union is taken round-robin (every column's first pick, then
    every second, ...) up to the budget. Joint (``joint=True``, a (D, m) target): one selection of
    ``budget`` rows in all for every column (``select(..., targets="joint")``). ``fill`` tops each
    column (joint: the shared selection) up to its k; ``topk_reduce`` is passed to top-k; ``screen``
    (a factor >= 1) turns on select's candidate screen (ceil(screen * K) rows kept, K the k asked
    of select: ``budget`` joint, m * ceil(budget / m) per column)."""
    columns = 1 if target.ndim == 1 else target.shape[1]
    per_column_k = budget if joint else max(1, -(-budget // columns))
    options: Dict[str, Any] = {"method": method, "checkpoint_weights": store_weights(method), "seed": seed,
                               "num_checkpoints": num_checkpoints}
    if align_threshold is not None:
        options["align_threshold"] = align_threshold
    if fill is not None:
        options["fill"] = fill
    if joint:
        options["targets"] = "joint"
    if topk_reduce is not None:
        options["topk_reduce"] = topk_reduce
    if screen is not None:
        options["screen"] = screen
    started = time.perf_counter()
    selection = gk.select(matrix, target, per_column_k, **options)
    seconds = time.perf_counter() - started
    if columns == 1 or joint:
        indices = np.asarray(selection.indices, dtype=np.int64)[:budget]
        weights = np.asarray(selection.weights, dtype=np.float64)[:budget]
    else:
        indices = round_robin([np.asarray(t.indices) for t in selection.per_target], budget)
        total = dict(zip(selection.indices.tolist(), np.asarray(selection.weights, dtype=np.float64).tolist()))
        weights = np.asarray([total[i] for i in indices.tolist()], dtype=np.float64)
    filled = getattr(selection, "num_filled", 0)
    info = {"guard_excluded": selection.params.get("guard_excluded", 0), "filled": int(filled),
            "screened_out": int(selection.params.get("screened_out", 0)),
            "stopped_by": sorted({str(t.stopped_by) for t in selection.per_target}),
            "relative_residual": selection.relative_residual}
    return Picked(indices, weights, seconds, info)


@dataclass(frozen=True)
class Variant:
    """One row of the study's tables: a method with its target construction and options.

    mode: "mean" (one column, the mean target gradient), "columns" (one column per target
    example, each its own share of the budget, union round-robin) or "joint" (one column per
    target example, one selection for all: ``targets="joint"``). screen: select's candidate-screen
    factor (None: off)."""

    method: str
    mode: str = "mean"
    align: Optional[float] = None
    fill: Optional[str] = None
    topk_reduce: Optional[str] = None
    screen: Optional[float] = None


def variant_table(joint_available: bool = True) -> Dict[str, Variant]:
    """The study's variants (both tasks). Dropped after the first study showed nothing (identical or worse in
    every cell): align>0 on the mean and per-example targets, training on the NNLS weights, and
    fill="residual" (ties or loses to fill="target")."""
    variants = {
        "gtp": Variant("gtp"),
        "gtp-cosamp": Variant("gtp-cosamp"),
        "topk": Variant("topk"),
        "random": Variant("random"),
        "gtp fill=target": Variant("gtp", fill="target"),
        "gtp per-example": Variant("gtp", "columns"),
        "topk per-example": Variant("topk", "columns"),
    }
    if joint_available:
        variants.update({
            "gtp joint": Variant("gtp", "joint"),
            "gtp joint fill=target": Variant("gtp", "joint", fill="target"),
            "gtp joint align>0": Variant("gtp", "joint", align=0.0),
            "gtp-cosamp joint": Variant("gtp-cosamp", "joint"),
            "topk joint mean-cos": Variant("topk", "joint", topk_reduce="mean"),
            "topk joint max-cos": Variant("topk", "joint", topk_reduce="max"),
        })
        if select_accepts("screen"):  # the candidate screen: every factor tried is shown
            variants.update({f"gtp joint screen={f:g}": Variant("gtp", "joint", screen=f) for f in SCREEN_FACTORS})
            from gtp_kernels.cli import DEFAULT_JOINT_SCREEN

            # what `gtp select` does with a target store and no options: joint, fill by the target, screened
            variants["gtp select defaults"] = Variant("gtp", "joint", fill="target", screen=DEFAULT_JOINT_SCREEN)
    return variants


def near_copy_picks(indices: Sequence[int], group_of: Dict[int, int]) -> int:
    """Picks that are a second (third, ...) member of a near-copy group already picked."""
    counts: Dict[int, int] = {}
    for i in indices:
        group = group_of.get(int(i))
        if group is not None:
            counts[group] = counts.get(group, 0) + 1
    return sum(c - 1 for c in counts.values())


def residual_curves(matrix: np.ndarray, target: np.ndarray, ks: Sequence[int], orders: Dict[str, np.ndarray],
                    weights, num_checkpoints: int) -> Dict[str, List[float]]:
    """Relative residual of the best non-negative fit on the first k picks of each order
    (``gk.fit_residual``: every method on the same footing)."""
    curves = {}
    for name, order in orders.items():
        curves[name] = [float(gk.fit_residual(matrix, target, order[:k], checkpoint_weights=weights,
                                                num_checkpoints=num_checkpoints))
                        for k in ks]
    return curves


def joint_residual_curves(matrix: np.ndarray, targets: np.ndarray, ks: Sequence[int], orders: Dict[str, np.ndarray],
                          weights, num_checkpoints: int) -> Dict[str, List[float]]:
    """For a (D, m) target of m examples: the root mean square over columns of each column's
    relative residual after its best non-negative fit on the first k picks (the joint objective
    on unit-norm columns, ``select(..., targets="joint")``)."""
    curves = {}
    for name, order in orders.items():
        curves[name] = [float(np.sqrt(np.mean([
            gk.fit_residual(matrix, targets[:, j], order[:k], checkpoint_weights=weights,
                            num_checkpoints=num_checkpoints) ** 2 for j in range(targets.shape[1])])))
            for k in ks]
    return curves


@contextmanager
def stage(times: Dict[str, float], name: str) -> Iterator[None]:
    """Wall seconds of a stage, kept under ``name`` (printed as it ends)."""
    started = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - started, 2)
    print(f"  [{name}: {times[name]:.1f} s]", flush=True)


def mean_spread(values: Sequence[float]) -> Dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "values": [float(v) for v in array]}


def write_json(path: Path, payload: Any) -> None:
    """Atomic: a temp file renamed over the result."""
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")


def save_figure(fig, path: Path) -> None:
    write_atomically(path, lambda handle: fig.savefig(handle, format="png", dpi=110, bbox_inches="tight"))


COLOURS = {"gtp": "tab:blue", "gtp-cosamp": "lightsteelblue", "topk": "tab:red", "random": "tab:gray",
           "full pool": "black", "gtp fill=target": "tab:cyan",
           "gtp per-example": "tab:purple", "topk per-example": "tab:orange", "gtp joint": "tab:green",
           "gtp joint fill=target": "tab:olive", "topk joint mean-cos": "tab:pink", "topk joint max-cos": "tab:brown",
           "gtp select defaults": "darkgreen"}


def plot_accuracy(ax, budgets_pct: Sequence[float], table: Dict[str, Dict[str, Dict[str, float]]],
                  full: Optional[Dict[str, float]], ylabel: str, title: str,
                  colours: Optional[Dict[str, Any]] = None) -> None:
    """Mean +- std against budget (log x), one line per method, the full pool as a band; a
    method's colour from ``colours`` (default COLOURS), matplotlib's cycle for one not there."""
    colours = COLOURS if colours is None else colours
    for method, by_budget in table.items():
        means = [by_budget[str(b)]["mean"] for b in budgets_pct]
        stds = [by_budget[str(b)]["std"] for b in budgets_pct]
        ax.errorbar(budgets_pct, means, yerr=stds, marker="o", capsize=3, label=method,
                    color=colours.get(method))
    if full is not None:
        ax.axhline(full["mean"], color="black", linestyle="--", label="full pool")
        ax.axhspan(full["mean"] - full["std"], full["mean"] + full["std"], color="black", alpha=0.08)
    ax.set_xscale("log")
    ax.set_xticks(budgets_pct)
    ax.set_xticklabels([f"{b:g}%" for b in budgets_pct])
    ax.set_xlabel("budget (share of the pool)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_residuals(ax, ks: Sequence[int], curves: Dict[str, List[float]], title: str) -> None:
    for name, values in curves.items():
        ax.plot(ks, values, marker=".", label=name, color=COLOURS.get(name))
    ax.set_xlabel("k (examples selected)")
    ax.set_ylabel("relative residual ||b - A_S^T w||_W / ||b||_W")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
