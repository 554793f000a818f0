"""The built-in default job: a synthetic gradient-trajectory pool and a side-by-side run.

The pool imitates what per-example projected LoRA gradients look like along a warm-up
(no downloads, no GPU):

* every example belongs to one of ``num_clusters`` skills; a skill's gradient direction
  drifts from checkpoint to checkpoint (the trajectory), and all gradients share a common
  component (the generic language-modelling direction);
* examples differ by their own direction and a log-normal gradient scale;
* a few examples of the target's skills come with many near-copies (templated or scraped
  duplicates, cosine > 0.99 with each other);
* the target is the mean gradient of a held-out set of examples from a few skills, and the
  checkpoints are weighted by a decaying learning rate.

Top-k ranks each example alone, so it fills the budget with near-copies of the most aligned
examples; GTP selects jointly and covers the target's skills.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .validation import SEED_LIMIT, InputError, check_int


@dataclass(frozen=True)
class SyntheticPool:
    candidates: np.ndarray         # (N, T, d) float32
    target: np.ndarray             # (T*d,) float32
    checkpoint_weights: np.ndarray  # (T,) learning rates
    skill: np.ndarray              # (N,) skill of each candidate
    duplicate_group: np.ndarray    # (N,) group id of near-copies, -1 for none
    target_skills: np.ndarray      # skills the target draws from


# the default pool's groups of near-copies (what top-k falls for)
NEAR_COPY_GROUPS = 60
COPIES_PER_GROUP = 8


def make_synthetic_pool(
    num_candidates: int = 8000,
    num_checkpoints: int = 4,
    dim: int = 256,
    num_clusters: int = 40,
    num_target_skills: int = 6,
    num_duplicate_groups: int = NEAR_COPY_GROUPS,
    copies_per_group: int = COPIES_PER_GROUP,
    seed: int = 0,
) -> SyntheticPool:
    if isinstance(seed, (int, np.integer)) and seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    T, d = num_checkpoints, dim

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    # Skill directions along the trajectory: each checkpoint drifts from the previous one.
    centers = np.empty((num_clusters, T, d))
    centers[:, 0] = unit(rng.standard_normal((num_clusters, d)))
    for t in range(1, T):
        centers[:, t] = unit(centers[:, t - 1] + 0.6 * unit(rng.standard_normal((num_clusters, d))))
    common = unit(rng.standard_normal((T, d)))  # shared language-modelling direction

    def examples(skills: np.ndarray, own: float) -> np.ndarray:
        n = skills.shape[0]
        x = centers[skills] + 0.5 * common[None] + own * unit(rng.standard_normal((n, T, d)))
        return x * rng.lognormal(0.0, 0.3, size=(n, 1, 1))

    target_skills = rng.choice(num_clusters, size=num_target_skills, replace=False)
    n_dup = num_duplicate_groups * copies_per_group
    n_plain = num_candidates - n_dup
    if n_plain <= 0:
        raise InputError(f"num_candidates must exceed num_duplicate_groups * copies_per_group = {n_dup} "
                         f"(the pool's near-copies), got {num_candidates}")
    skill = rng.integers(0, num_clusters, size=n_plain)
    pool = examples(skill, own=1.0)

    # Near-copies of well-aligned examples from the target's skills (weight on skill > own).
    seed_skills = target_skills[rng.integers(0, num_target_skills, size=num_duplicate_groups)]
    seeds = examples(seed_skills, own=0.6)
    copies = np.repeat(seeds, copies_per_group, axis=0)
    copies = copies + 0.02 * np.linalg.norm(copies, axis=-1, keepdims=True) * unit(
        rng.standard_normal(copies.shape)) / np.sqrt(1.0)
    dup_group = np.concatenate([np.full(n_plain, -1), np.repeat(np.arange(num_duplicate_groups), copies_per_group)])
    all_skill = np.concatenate([skill, np.repeat(seed_skills, copies_per_group)])
    cands = np.concatenate([pool, copies], axis=0)
    order = rng.permutation(num_candidates)
    cands, all_skill, dup_group = cands[order], all_skill[order], dup_group[order]

    # Target: mean gradient of held-out examples of the target skills (unequal mixture).
    mix = rng.dirichlet(np.ones(num_target_skills) * 2.0)
    held_out_skills = rng.choice(target_skills, size=64, p=mix)
    target = examples(held_out_skills, own=1.0).mean(axis=0).reshape(T * d)
    lrs = np.linspace(2e-5, 5e-6, T)
    return SyntheticPool(cands.astype(np.float32), target.astype(np.float32), lrs, all_skill,
                         dup_group, np.sort(target_skills))


def count_near_duplicates(rows: np.ndarray, threshold: float = 0.95) -> int:
    """Selected rows that have an earlier-selected row with cosine > threshold."""
    if len(rows) < 2:
        return 0
    x = rows.reshape(len(rows), -1).astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    return int((np.tril(cos, k=-1) > threshold).any(axis=1).sum())


def min_demo_candidates() -> int:
    """The smallest pool the demo builds: one plain example more than its near-copies."""
    return NEAR_COPY_GROUPS * COPIES_PER_GROUP + 1


def check_demo_arguments(k, num_candidates, seed, method: Optional[str], label=lambda name: name) -> str:
    """InputError for a demo argument run_demo cannot take (label(name) names it: the CLI passes
    its flags); returns the GTP method to show first."""
    from .api import DEFAULT_METHOD, METHODS

    gtp = DEFAULT_METHOD if method is None else method
    if gtp not in METHODS:
        raise InputError(f"{label('method')}: unknown method {gtp!r}; choose one of: {', '.join(METHODS)}")
    k = check_int(k, label("k"))
    num_candidates = check_int(num_candidates, label("num_candidates"))
    check_int(seed, label("seed"))
    if num_candidates < min_demo_candidates():
        raise InputError(f"{label('num_candidates')} must be at least {min_demo_candidates()} (the demo pool holds "
                         f"{min_demo_candidates() - 1} near-copies plus at least one plain example), got {num_candidates}")
    if not 1 <= k <= num_candidates:
        raise InputError(f"{label('k')} must lie in [1, {label('num_candidates')}={num_candidates}], got {k}")
    check_int(seed, label("seed"), low=0, high=SEED_LIMIT - 1)  # torch.Generator's range
    return gtp


def plot_format(path: str) -> str:
    """The matplotlib format a plot path asks for by its suffix (no suffix: png); checked up front.

    Raises InputError when matplotlib is missing or cannot write that format, or when the path
    cannot be written (a folder, a missing or read-only parent).
    """
    from .files import check_output_file

    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise InputError("--plot needs matplotlib: pip install matplotlib") from exc
    suffix = Path(path).suffix.lower().lstrip(".")
    fmt = suffix or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise InputError(f"--plot {path}: matplotlib cannot write {suffix!r} files; "
                         f"use one of: {', '.join(sorted(supported))}")
    try:  # some formats need more than matplotlib (Pillow plugins, LaTeX): try a small figure with text
        import io as _io

        probe = Figure(figsize=(1, 1))
        probe.add_subplot().set_title("x")
        probe.savefig(_io.BytesIO(), format=fmt)
    except Exception as exc:
        raise InputError(f"--plot {path}: matplotlib cannot write {fmt!r} here "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    check_output_file(path, "--plot")
    return fmt


def run_demo(k: int = 64, num_candidates: int = 8000, seed: int = 0, method: Optional[str] = None,
             plot: Optional[str] = None, echo=print) -> List[Dict[str, float]]:
    """Run GTP, top-k and random on the synthetic pool at budget k; print a table.

    ``method`` is the GTP method shown first (default: the fastest exact one); any name in
    METHODS is accepted and shown once. Every argument is checked before the pool is built.
    """
    from .api import fit_residual, select

    gtp = check_demo_arguments(k, num_candidates, seed, method)
    fmt = plot_format(plot) if plot else None  # checked before the work, not after
    t0 = time.perf_counter()
    pool = make_synthetic_pool(num_candidates=num_candidates, seed=seed)
    echo(f"synthetic pool: N={pool.candidates.shape[0]} candidates, T={pool.candidates.shape[1]} checkpoints, "
         f"d={pool.candidates.shape[2]} ({time.perf_counter() - t0:.2f} s to build); budget k={k}")
    A = torch.from_numpy(pool.candidates)
    b = torch.from_numpy(pool.target)
    names = [gtp] + [name for name in ("topk", "random") if name != gtp]
    rows = []
    selections = {}
    for name in names:
        sel = select(A, b, k, method=name, checkpoint_weights=pool.checkpoint_weights, seed=seed)
        idx = sel.indices
        rel = fit_residual(A, b, idx, checkpoint_weights=pool.checkpoint_weights)
        rows.append({
            "method": name,
            "selected": len(idx),
            "relative_residual": rel,
            "near_duplicates": count_near_duplicates(pool.candidates[idx]),
            "target_skills_covered": len(set(pool.skill[idx].tolist()) & set(pool.target_skills.tolist())),
            "time_s": sel.timings["total_s"],
        })
        selections[name] = sel
    header = f"{'method':<14} {'selected':>8} {'rel. residual':>13} {'near-dups':>9} {'target skills':>13} {'time (s)':>9}"
    echo(header)
    echo("-" * len(header))
    for r in rows:
        echo(f"{r['method']:<14} {r['selected']:>8d} {r['relative_residual']:>13.4f} {r['near_duplicates']:>9d} "
             f"{r['target_skills_covered']:>8d} of {len(pool.target_skills):<2d} {r['time_s']:>9.3f}")
    echo("rel. residual: ||b - A_S^T w||_W / ||b||_W of the best non-negative fit on the selected rows "
         "(lower is better); near-dups: selected rows with cosine > 0.95 to an earlier pick.")
    if plot:
        _plot_residual_curves(A, b, pool, selections, plot, fmt)
        echo(f"plot written to {plot}")
    return rows


def _plot_residual_curves(A, b, pool, selections, path, fmt: str = "png") -> None:
    """Relative residual against the number of selected examples, per method.

    Pursuit methods draw their own residual history; methods without one (top-k, random) the
    best non-negative fit on their first j picks, at a dozen values of j.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .api import fit_residual
    from .atomic import atomic_write_bytes
    import io as _io

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sel in selections.items():
        hist = np.asarray(sel.residual_norms, dtype=np.float64)
        if hist.ndim == 1 and len(hist) and hist[0] > 0:
            ax.plot(np.arange(len(hist)), hist / hist[0], label=name)
            continue
        idx = sel.indices
        if len(idx) == 0:
            continue
        ks = np.unique(np.linspace(1, len(idx), 12).astype(int))
        ax.plot(ks, [fit_residual(A, b, idx[:j], checkpoint_weights=pool.checkpoint_weights) for j in ks],
                marker="o", label=name)
    ax.set_xlabel("examples selected (GTP: pursuit steps; NNLS may drop one)")
    ax.set_ylabel("relative residual ||r||/||b||")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Matching the target gradient trajectory")
    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
