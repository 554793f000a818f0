"""Gradient trajectories from transformers models: warm-up, per-example gradients, K1, the store.

    from gtp_kernels.collect import collect_trajectory, select_from_stores
    pool = collect_trajectory("path/to/model", "pool.jsonl", "pool_store")            # warm-up + Adam grads
    val = collect_trajectory("path/to/model", "val.jsonl", "val_store",
                             checkpoints="pool_store/warmup", gradient_type="sgd")    # targets
    sel = select_from_stores(pool, val, k)   # the mean target row; the shards stay memory-mapped
    chosen_ids = [pool.ids[i] for i in sel.indices]

transformers and peft are imported only when a model is built or trained.
"""
from .data import ExampleFormat, collate, read_jsonl, tokenize_all, write_selected_examples
from .less_store import LessGradients, less_to_store, read_less_gradients
from .per_example import adam_precondition, per_example_gradients, per_example_gradients_loop, trainable_parameters
from .distributed import collect_distributed
from .pipeline import collect_trajectory
from .projector import Projector
from .store import StoreError, StoreSpec, TrajectoryStore, TrajectoryStoreWriter, is_store, open_store
from .store_selection import StoreReader, select_from_stores, selection_weights
from .targets import TARGET_MODES, store_target
from .warmup import (
    Checkpoint, LoraSettings, WarmupDidNotLearnWarning, WarmupProgress, WarmupSettings, load_checkpoints, warmup_losses,
    warmup_progress_report, warmup_train, wrap_for_training,
)

__all__ = [
    "collect_trajectory", "collect_distributed", "Projector", "select_from_stores", "selection_weights", "StoreReader",
    "open_store", "is_store", "store_target", "TARGET_MODES", "write_selected_examples", "TrajectoryStore", "TrajectoryStoreWriter", "StoreSpec", "StoreError",
    "read_less_gradients", "less_to_store", "LessGradients",
    "per_example_gradients", "per_example_gradients_loop", "adam_precondition", "trainable_parameters",
    "warmup_train", "wrap_for_training", "load_checkpoints", "WarmupSettings", "LoraSettings", "Checkpoint",
    "warmup_losses", "warmup_progress_report", "WarmupProgress", "WarmupDidNotLearnWarning",
    "ExampleFormat", "read_jsonl", "tokenize_all", "collate",
]
