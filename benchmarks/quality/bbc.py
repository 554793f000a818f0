"""Task A: BBC News topic classification with MiniLM; a clean and a noisy pool (flipped labels and
near-copies), a few dozen held-out clean target articles, a held-out test set.

Pipeline per the issue: ``collect_trajectory`` (LoRA warm-up, Adam-preconditioned per-example
gradients, K1 projection, the store) for the pool, the same checkpoints with plain gradients for
the targets, ``gtp_kernels.select`` for every method and budget; then a fresh classifier is
trained on each selection and scored on the test set.

Training recipe (the same for every method and budget): a multinomial logistic-regression head
(scikit-learn, L-BFGS, C = 10, no intercept, no class weighting) on frozen, mean-pooled, L2-normalised MiniLM
features of the selected articles with their pool labels. Head-only, not LoRA: 4 methods x 4
budgets x 3 seeds x 2 pools plus the ablations are ~250 trainings; a LoRA fine-tune of MiniLM
costs minutes each on 2 CPU cores, a head on cached features milliseconds, which is what fits
the study's 30 minutes. The selection model (LoRA + head, warmed up) and the trained model
(head on the frozen encoder) share the encoder; LESS shows that gradient selections transfer
across such variants.
"""
from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from gtp_kernels.atomic import write_atomically

from study import (COLOURS, budget_rows, joint_residual_curves, mean_spread, near_copy_picks, plot_accuracy,
                   plot_residuals, residual_curves, save_figure, select_accepts, select_budget, stage, train_and_score,
                   variant_table)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
from bbc_news import bbc_articles, minilm_path  # noqa: E402  (the loaders the BBC recipe uses)


@dataclass(frozen=True)
class BbcSettings:
    base_pool: int          # distinct articles in the pool
    copy_sources: int       # articles that get near-copies in the noisy pool
    copies_per_source: int
    flip_share: float       # share of the noisy pool's distinct articles with a wrong label
    targets: int            # clean held-out target articles per seed
    test: int               # held-out test articles
    seeds: tuple
    budgets_pct: tuple
    d: int                  # projected dims per checkpoint
    checkpoints: int        # T
    max_length: int         # tokens per article for the gradients
    feature_max_length: int  # tokens per article for the trained head's features
    lora_r: int
    lora_layers: tuple      # MiniLM layers that get LoRA on query and value
    warmup_fraction: float
    warmup_lr: float
    batch_size: int
    head_c: float
    # None: seed i warms up with seed i (its own warm-up rows and order, so its own store); an int:
    # every seed shares that one warm-up (the first study's protocol)
    warmup_seed: Optional[int] = None


FULL = BbcSettings(base_pool=400, copy_sources=20, copies_per_source=10, flip_share=0.25, targets=24, test=400,
                   seeds=(0, 1, 2), budgets_pct=(1, 2, 5, 10), d=1024, checkpoints=4, max_length=64,
                   feature_max_length=128, lora_r=4, lora_layers=(4, 5), warmup_fraction=0.1, warmup_lr=1e-2,
                   batch_size=16, head_c=10.0)
QUICK = BbcSettings(base_pool=48, copy_sources=3, copies_per_source=4, flip_share=0.25, targets=6, test=60,
                    seeds=(0, 1), budgets_pct=(5, 10, 20), d=128, checkpoints=2, max_length=32,
                    feature_max_length=32, lora_r=2, lora_layers=(5,), warmup_fraction=0.25, warmup_lr=1e-3,
                    batch_size=16, head_c=10.0)


def near_copy(text: str, rng: random.Random) -> str:
    """The article with about 5% of its words dropped (a scraped re-post, not an exact copy)."""
    words = text.split()
    kept = [w for w in words if rng.random() >= 0.05]
    return " ".join(kept if kept else words)


def build_pools(s: BbcSettings, seed: int = 0) -> Dict[str, Any]:
    """Split the corpus into test, target reservoir and pool; make the noisy pool.

    Noisy pool = the pool's articles with ``flip_share`` of their labels changed to another topic
    (uniformly) plus ``copies_per_source`` near-copies of ``copy_sources`` random pool articles
    (a copy carries its source's pool label). Collected rows: the noisy pool, then each flipped
    article once more under its true label (so the clean pool is rows of the same store)."""
    rng = random.Random(seed)
    articles = bbc_articles()
    topics = sorted({a["label"] for a in articles})
    rng.shuffle(articles)
    test = articles[: s.test]
    reservoir = articles[s.test : s.test + s.targets * len(s.seeds)]
    base = articles[s.test + len(reservoir) : s.test + len(reservoir) + s.base_pool]
    flipped = set(rng.sample(range(len(base)), round(s.flip_share * len(base))))
    noisy_rows, true_label, group_of = [], [], {}
    for i, a in enumerate(base):
        label = rng.choice([t for t in topics if t != a["label"]]) if i in flipped else a["label"]
        noisy_rows.append({"id": a["id"], "text": a["text"], "label": label})
        true_label.append(a["label"])
    for source in sorted(rng.sample(range(len(base)), s.copy_sources)):
        group_of[source] = source
        for j in range(s.copies_per_source):
            group_of[len(noisy_rows)] = source
            noisy_rows.append({"id": f"{base[source]['id']}#copy{j}", "text": near_copy(base[source]["text"], rng),
                               "label": noisy_rows[source]["label"]})
            true_label.append(base[source]["label"])
    relabelled = [{"id": f"{base[i]['id']}@true", "text": base[i]["text"], "label": base[i]["label"]}
                  for i in sorted(flipped)]
    row_of_true = {i: len(noisy_rows) + n for n, i in enumerate(sorted(flipped))}
    clean_index = np.asarray([row_of_true.get(i, i) for i in range(len(base))], dtype=np.int64)
    noisy_index = np.arange(len(noisy_rows), dtype=np.int64)
    rows = noisy_rows + relabelled
    row_true = true_label + [r["label"] for r in relabelled]
    return {"topics": topics, "test": test, "reservoir": reservoir, "rows": rows, "noisy_rows": noisy_rows,
            "relabelled": relabelled, "row_true": row_true, "group_of": group_of,
            "pools": {"clean": clean_index, "noisy": noisy_index}, "flipped": sorted(flipped)}


def mean_pooled_features(texts: List[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """Frozen MiniLM sentence embeddings: attention-masked mean of the last hidden state, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
    return np.concatenate(out).astype(np.float32)


def clean_balanced_reference(index: np.ndarray, row_y: np.ndarray, row_true: np.ndarray, row_x: np.ndarray,
                             test_x: np.ndarray, test_y: np.ndarray, budget: int, n_topics: int, s: "BbcSettings",
                             draws: int = 20) -> Dict[str, Any]:
    """What the recipe reaches on ``budget`` rows that an oracle knows to be correctly labelled,
    spread over the topics as evenly as the budget allows (random rows within each topic,
    ``draws`` draws, seeded). Not a selector (it reads the true labels): a reference for what
    "the right rows" are worth at this budget, to read the methods' numbers against."""
    rng = np.random.default_rng(12345 + budget)
    clean = index[row_y[index] == row_true[index]]
    by_topic = [clean[row_y[clean] == c] for c in range(n_topics)]
    accs = []
    for _ in range(draws):
        order = rng.permutation(n_topics)  # which topics get the budget's remainder
        counts = [budget // n_topics + (rank < budget % n_topics) for rank in np.argsort(order)]
        picked = np.concatenate([rng.choice(rows, min(c, len(rows)), replace=False)
                                 for rows, c in zip(by_topic, counts)])
        accs.append(train_and_score(row_x[picked], row_y[picked], test_x, test_y, s.head_c))
    return mean_spread(accs)


def mislabel_separation(pool_rows: np.ndarray, target_rows: np.ndarray, data: Dict[str, Any]) -> Dict[str, float]:
    """How well the gradients tell the noisy pool's mislabelled rows from its clean ones: the
    AUC (probability that a random clean row scores above a random mislabelled one; 0.5 = no
    signal) of two cosine scores against the store's target articles: the maximum over all
    targets, and the mean over the targets of the row's own (pool) label."""
    from scipy.stats import rankdata

    n = len(data["noisy_rows"])
    pool = np.asarray(pool_rows[:n], dtype=np.float64)
    targets = np.asarray(target_rows, dtype=np.float64)
    cosines = (pool / np.linalg.norm(pool, axis=1, keepdims=True)) @ (
        targets / np.linalg.norm(targets, axis=1, keepdims=True)).T
    labels = np.asarray([r["label"] for r in data["noisy_rows"]])
    clean = labels == np.asarray(data["row_true"][:n])
    target_labels = np.asarray([a["label"] for a in data["reservoir"]])[: targets.shape[0]]

    def auc(score: np.ndarray) -> float:
        ranks = rankdata(score)
        n_clean = int(clean.sum())
        return float((ranks[clean].sum() - n_clean * (n_clean + 1) / 2) / (n_clean * int((~clean).sum())))

    own = np.asarray([cosines[i, target_labels == labels[i]].mean() for i in range(n)])
    return {"auc_max_cosine": auc(cosines.max(axis=1)), "auc_own_label_mean_cosine": auc(own)}


def collect(s: BbcSettings, data: Dict[str, Any], cache: Path, times: Dict[str, float], progress: bool,
            warmup_seed: int) -> Dict[str, Any]:
    """The pool's and targets' trajectory stores for one warm-up (cached under ``cache/w<seed>``:
    the store resumes or reuses what exists)."""
    import transformers
    from transformers import AutoTokenizer

    from gtp_kernels.collect.pipeline import collect_trajectory
    from gtp_kernels.collect.store import check_compatible
    from gtp_kernels.collect.warmup import LoraSettings, WarmupSettings

    transformers.logging.set_verbosity_error()  # the untrained 5-way head is expected, not news
    model = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    modules = tuple(f"layer.{layer}.attention.self.{m}" for layer in s.lora_layers for m in ("query", "value"))
    common = dict(tokenizer=tokenizer, task="classification", d=s.d, max_length=s.max_length,
                  batch_size=s.batch_size, shard_size=4096, progress=progress, device="cpu")
    warmup = WarmupSettings(fraction=s.warmup_fraction, epochs=s.checkpoints, learning_rate=s.warmup_lr,
                            batch_size=s.batch_size, seed=warmup_seed, lora=LoraSettings(r=s.lora_r, alpha=4 * s.lora_r,
                                                                              target_modules=modules))
    cache = cache / f"w{warmup_seed}"
    with stage(times, f"collect noisy pool (warm-up {warmup_seed} + adam gradients)"):
        noisy = collect_trajectory(model, data["noisy_rows"], cache / "noisy_store", warmup=warmup,
                                   gradient_type="adam", **common)
    warm = cache / "noisy_store" / "warmup"
    with stage(times, f"collect relabelled rows (warm-up {warmup_seed}, adam gradients)"):
        relabelled = collect_trajectory(model, data["relabelled"], cache / "relabelled_store", checkpoints=warm,
                                        gradient_type="adam", **common)
    targets = data["reservoir"]
    with stage(times, f"collect targets (warm-up {warmup_seed}, sgd gradients)"):
        target_store = collect_trajectory(model, targets, cache / "target_store", checkpoints=warm,
                                          gradient_type="sgd", **common)
    check_compatible(noisy, relabelled)
    check_compatible(noisy, target_store)
    matrix = np.concatenate([noisy.candidates(), relabelled.candidates()]).astype(np.float32)
    return {"matrix": matrix, "targets": np.asarray(target_store.candidates(), dtype=np.float32),
            "store": noisy, "metadata": {k: v for k, v in noisy.metadata.items() if k not in ("ids", "format")},
            "mislabel_separation": mislabel_separation(noisy.candidates(), target_store.candidates(), data)}


def run(s: BbcSettings, cache: Path, out: Path, times: Dict[str, float], progress: bool, quick: bool) -> Dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache.mkdir(parents=True, exist_ok=True)
    data = build_pools(s)
    topics = data["topics"]
    label_id = {t: i for i, t in enumerate(topics)}
    warmups = {seed: seed if s.warmup_seed is None else s.warmup_seed for seed in s.seeds}
    stores = {w: collect(s, data, cache, times, progress, w) for w in sorted(set(warmups.values()))}
    collected = {seed: stores[w] for seed, w in warmups.items()}
    first = collected[s.seeds[0]]  # the residual curves' seed

    with stage(times, "features for the trained head (frozen MiniLM)"):
        feature_file = cache / f"features_{s.feature_max_length}.npz"
        texts = [r["text"] for r in data["rows"]] + [a["text"] for a in data["test"]]
        if feature_file.exists() and np.load(feature_file)["x"].shape[0] == len(texts):
            feats = np.load(feature_file)["x"]
        else:
            feats = mean_pooled_features(texts, s.feature_max_length)
            write_atomically(feature_file, lambda handle: np.savez(handle, x=feats))
    n_rows = len(data["rows"])
    row_x, test_x = feats[:n_rows], feats[n_rows:]
    row_y = np.asarray([label_id[r["label"]] for r in data["rows"]])
    row_true = np.asarray([label_id[t] for t in data["row_true"]])
    test_y = np.asarray([label_id[a["label"]] for a in data["test"]])
    mislabelled = row_y != row_true

    def weights_for(method: str):
        from gtp_kernels import METHODS as REGISTRY

        # every warm-up has the same schedule, so the same checkpoint weights (checked below)
        return first["store"].weights_for(REGISTRY[method].block_scale_invariant)

    for seed, c in collected.items():
        if not np.allclose(c["store"].metadata["checkpoint_weights"], first["store"].metadata["checkpoint_weights"]):
            raise RuntimeError(f"warm-up {warmups[seed]} has other checkpoint weights than warm-up {warmups[s.seeds[0]]}")
    t = first["store"].t

    def target_for(seed: int, mode: str) -> np.ndarray:
        position = s.seeds.index(seed)
        rows = collected[seed]["targets"][position * s.targets : (position + 1) * s.targets]
        return rows.mean(axis=0) if mode == "mean" else np.ascontiguousarray(rows.T)

    variants = variant_table(select_accepts("targets"))
    results: Dict[str, Any] = {"settings": asdict(s), "topics": topics, "collection": first["metadata"],
                               "warmups": {str(w): {"losses": c["metadata"].get("warmup_losses"),
                                                    "mislabel_separation": c["mislabel_separation"]}
                                           for w, c in stores.items()},
                               "pools": {}}
    for pool_name, index in data["pools"].items():
        n = len(index)
        pool_matrices = {seed: c["matrix"][index] for seed, c in collected.items()}
        pool_matrix = pool_matrices[s.seeds[0]]
        groups = {p: data["group_of"][int(r)] for p, r in enumerate(index) if int(r) in data["group_of"]}
        pool_result: Dict[str, Any] = {"n": n, "mislabelled": int(mislabelled[index].sum()),
                                       "near_copy_rows": len(groups), "variants": {}}
        full = train_and_score(row_x[index], row_y[index], test_x, test_y, s.head_c)
        pool_result["full_pool_accuracy"] = {"mean": full, "std": 0.0, "values": [full] * len(s.seeds)}
        pool_result["clean_balanced_reference"] = {
            str(pct): clean_balanced_reference(index, row_y, row_true, row_x, test_x, test_y, budget_rows(pct, n),
                                               len(topics), s) for pct in s.budgets_pct}
        with stage(times, f"select + train, {pool_name} pool"):
            for name, v in variants.items():
                per_budget: Dict[str, Any] = {}
                for pct in s.budgets_pct:
                    budget = budget_rows(pct, n)
                    accs, copies, wrong, sizes, secs, infos = [], [], [], [], [], []
                    for seed in s.seeds:
                        picked = select_budget(pool_matrices[seed], target_for(seed, v.mode), budget, v.method,
                                               store_weights=weights_for, num_checkpoints=t, seed=seed,
                                               align_threshold=v.align, fill=v.fill, joint=v.mode == "joint",
                                               topk_reduce=v.topk_reduce, screen=v.screen)
                        rows = index[picked.indices]
                        accs.append(train_and_score(row_x[rows], row_y[rows], test_x, test_y, s.head_c))
                        copies.append(near_copy_picks(picked.indices, groups))
                        wrong.append(int(mislabelled[rows].sum()))
                        sizes.append(len(rows))
                        secs.append(picked.seconds)
                        infos.append(picked.info)
                    per_budget[str(pct)] = {"budget": budget, "accuracy": mean_spread(accs),
                                            "near_copy_picks": copies, "mislabelled_picks": wrong, "selected": sizes,
                                            "select_seconds": float(np.median(secs)), "info": infos}
                pool_result["variants"][name] = per_budget
        # Fig. 3: residual against k on the same footing (seed 0, mean target)
        with stage(times, f"residual curves, {pool_name} pool"):
            top = budget_rows(max(s.budgets_pct), n)
            target = target_for(s.seeds[0], "mean")
            orders = {m: select_budget(pool_matrix, target, top, m, store_weights=weights_for, num_checkpoints=t, seed=0).indices
                      for m in ("gtp", "topk", "random")}
            ks = sorted({k for k in np.unique(np.geomspace(1, top, num=12).round().astype(int)).tolist()})
            ks = [k for k in ks if all(len(o) >= k for o in orders.values())]
            pool_result["residual_curve"] = {"k": ks, **residual_curves(
                pool_matrix, target, ks, orders, first["store"].selection_checkpoint_weights, t)}
            if "gtp joint" in variants:  # the joint objective: per-example columns, RMS relative residual
                examples = target_for(s.seeds[0], "joint")
                joint_orders = {name: select_budget(pool_matrix, examples, top, variants[name].method,
                                                    store_weights=weights_for, num_checkpoints=t, seed=0,
                                                    joint=True, topk_reduce=variants[name].topk_reduce).indices
                                for name in ("gtp joint", "topk joint mean-cos", "random")}
                jks = [k for k in ks if all(len(o) >= k for o in joint_orders.values())]
                pool_result["joint_residual_curve"] = {"k": jks, **joint_residual_curves(
                    pool_matrix, examples, jks, joint_orders, first["store"].selection_checkpoint_weights, t)}
        results["pools"][pool_name] = pool_result

    # figures
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, pool_name in zip(axes, results["pools"]):
        pr = results["pools"][pool_name]
        shown = [m for m in ("gtp", "topk", "random", "gtp per-example", "topk per-example", "gtp joint",
                             "gtp select defaults", "topk joint mean-cos", "topk joint max-cos") if m in pr["variants"]]
        table = {m: {b: v["accuracy"] for b, v in pr["variants"][m].items()} for m in shown}
        plot_accuracy(ax, s.budgets_pct, table, pr["full_pool_accuracy"], "test accuracy (3 seeds, mean +- std)",
                      f"BBC News, {pool_name} pool (N={pr['n']})")
        reference = pr["clean_balanced_reference"]
        ax.plot(s.budgets_pct, [reference[str(b)]["mean"] for b in s.budgets_pct], color="grey", linestyle=":",
                marker="_", label="oracle: clean, balanced rows")
        ax.legend(fontsize=8)
    save_figure(fig, out / "bbc_accuracy.png")
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, pool_name in zip(axes, results["pools"]):
        curve = results["pools"][pool_name]["residual_curve"]
        plot_residuals(ax, curve["k"], {m: curve[m] for m in ("gtp", "topk", "random")},
                       f"BBC News, {pool_name} pool: residual against k (seed 0)")
        joint = results["pools"][pool_name].get("joint_residual_curve")
        if joint:
            for m in (m for m in joint if m != "k"):
                ax.plot(joint["k"], joint[m], marker="x", linestyle="--", label=f"{m} (per-example RMS)",
                        color=COLOURS.get(m, COLOURS.get(m.split(" ")[0])))
            ax.legend(fontsize=8)
    save_figure(fig, out / "bbc_residual.png")
    plt.close(fig)
    pr = results["pools"]["noisy"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    shown = [m for m in ("gtp", "topk", "random", "gtp per-example", "gtp joint", "gtp select defaults",
                         "topk joint mean-cos") if m in pr["variants"]]
    width = 0.8 / len(shown)
    for j, m in enumerate(shown):
        xs = np.arange(len(s.budgets_pct)) + j * width
        axes[0].bar(xs, [np.mean(pr["variants"][m][str(b)]["near_copy_picks"]) for b in s.budgets_pct], width,
                    label=m, color=COLOURS.get(m))
        axes[1].bar(xs, [np.mean(np.asarray(pr["variants"][m][str(b)]["mislabelled_picks"])
                                 / np.asarray(pr["variants"][m][str(b)]["selected"])) for b in s.budgets_pct],
                    width, label=m, color=COLOURS.get(m))
    for ax, title in zip(axes, ("near-copy picks (2nd+ member of a copy group)", "share of picks mislabelled")):
        ax.set_xticks(np.arange(len(s.budgets_pct)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{b:g}%" for b in s.budgets_pct])
        ax.set_xlabel("budget")
        ax.set_title(f"BBC noisy pool: {title}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[1].axhline(pr["mislabelled"] / pr["n"], color="black", linestyle="--", label="pool share")
    save_figure(fig, out / "bbc_redundancy.png")
    plt.close(fig)
    return results
