"""What both tasks of the quality study share: selection through ``gtp_kernels.select`` at a total
budget, the redundancy counts, residual-against-k curves, timings and figures."""
from __future__ import annotations

import inspect
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

import gtp_kernels as gk
from gtp_kernels.atomic import atomic_write_text, write_atomically

METHODS = ("gtp", "gtp-cosamp", "topk", "random")


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


def select_budget(matrix: np.ndarray, target: np.ndarray, budget: int, method: str, *, store_weights,
                  seed: int, num_checkpoints: int, align_threshold: Optional[float] = None,
                  fill: Optional[str] = None) -> Picked:
    """``budget`` rows by ``method`` for a (D,) target or a (D, m) target (one column per target
    example). ``select`` holds k per column: with m columns each is asked for ceil(budget / m)
    rows and the union is taken round-robin (every column's first pick, then every second, ...)
    up to the budget. ``fill`` (when this gtp_kernels has it) tops each column up to its k."""
    columns = 1 if target.ndim == 1 else target.shape[1]
    per_column_k = max(1, -(-budget // columns))
    options: Dict[str, Any] = {"method": method, "checkpoint_weights": store_weights(method), "seed": seed,
                               "num_checkpoints": num_checkpoints}
    if align_threshold is not None:
        options["align_threshold"] = align_threshold
    if fill is not None:
        options["fill"] = fill
    started = time.perf_counter()
    selection = gk.select(matrix, target, per_column_k, **options)
    seconds = time.perf_counter() - started
    if columns == 1:
        indices = np.asarray(selection.indices, dtype=np.int64)[:budget]
        weights = np.asarray(selection.weights, dtype=np.float64)[:budget]
    else:
        indices = round_robin([np.asarray(t.indices) for t in selection.per_target], budget)
        total = dict(zip(selection.indices.tolist(), np.asarray(selection.weights, dtype=np.float64).tolist()))
        weights = np.asarray([total[i] for i in indices.tolist()], dtype=np.float64)
    filled = getattr(selection, "num_filled", 0)
    info = {"guard_excluded": selection.params.get("guard_excluded", 0), "filled": int(filled),
            "stopped_by": sorted({str(t.stopped_by) for t in selection.per_target})}
    return Picked(indices, weights, seconds, info)


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


COLOURS = {"gtp": "tab:blue", "gtp-cosamp": "tab:cyan", "topk": "tab:red", "random": "tab:gray",
           "full pool": "black", "gtp fill=target": "tab:green", "gtp fill=residual": "tab:olive",
           "gtp per-example": "tab:purple", "topk per-example": "tab:orange"}


def plot_accuracy(ax, budgets_pct: Sequence[float], table: Dict[str, Dict[str, Dict[str, float]]],
                  full: Optional[Dict[str, float]], ylabel: str, title: str) -> None:
    """Mean +- std against budget (log x), one line per method, the full pool as a band."""
    for method, by_budget in table.items():
        means = [by_budget[str(b)]["mean"] for b in budgets_pct]
        stds = [by_budget[str(b)]["std"] for b in budgets_pct]
        ax.errorbar(budgets_pct, means, yerr=stds, marker="o", capsize=3, label=method,
                    color=COLOURS.get(method))
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
