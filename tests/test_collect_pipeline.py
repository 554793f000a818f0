"""collect_trajectory end to end on tiny models: values, resume, targets, then selection."""
import json
import math

import numpy as np
import pytest
import torch

from collect_tiny import (
    classification_records, decoder_classifier, instruction_records, tiny_bert_classifier, tiny_llama, tiny_tokenizer,
    write_jsonl,
)
from gtp_kernels.collect.data import as_examples, collate, pad_token_id, tokenize_all, write_selected_examples
from gtp_kernels.collect.per_example import adam_precondition, per_example_gradients_loop
from gtp_kernels.collect.pipeline import collect_trajectory
from gtp_kernels.collect.store import StoreError, is_store, open_store
from gtp_kernels.collect.warmup import LoraSettings, WarmupSettings, load_adam_moments, load_checkpoints, load_trainable_state, wrap_for_training
from gtp_kernels.ops.project import projection_matrix

LORA = LoraSettings(r=4, alpha=8)
WARMUP = WarmupSettings(fraction=0.5, epochs=2, learning_rate=5e-3, batch_size=4, lora=LORA)
COMMON = dict(d=48, batch_size=4, shard_size=10, progress=False)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A warmed-up pool store (the warm-up runs inside collect_trajectory)."""
    root = tmp_path_factory.mktemp("pool")
    data = write_jsonl(root / "pool.jsonl", instruction_records(23, seed=1))
    tokenizer = tiny_tokenizer(chat_template=True)
    store = collect_trajectory(tiny_llama, data, root / "store", tokenizer=tokenizer, warmup=WARMUP, **COMMON)
    return root, data, tokenizer, store


def test_store_matches_independent_computation(pool):
    root, data, tokenizer, store = pool
    assert (store.n, store.t, store.d) == (23, 2, 48) and store.ids[:2] == ["ex0", "ex1"]
    meta = store.metadata
    assert meta["gradient_type"] == "adam" and meta["projection"]["seeds"] == [0, 1] and store.weights_applied
    assert store.selection_checkpoint_weights is None
    weights = store.checkpoint_weights
    assert sum(weights) == pytest.approx(1.0) and weights[0] > weights[1]  # linear decay: epoch 1 has larger lr
    view = np.asarray(store.trajectory_view(), dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(view, axis=2), np.sqrt(weights)[None, :].repeat(23, 0), rtol=1e-5)

    # Recompute rows 0, 11 and 22 from scratch: one backward per example, Adam formula, dense Pi.
    checkpoints = load_checkpoints(root / "store" / "warmup")
    model = wrap_for_training(tiny_llama(), "causal_lm", LORA).eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    tokens = tokenize_all(as_examples(instruction_records(23, seed=1)), tokenizer, "causal_lm")
    batch = collate([tokens[i] for i in (0, 11, 22)], pad_token_id(tokenizer))
    for t, checkpoint in enumerate(checkpoints):
        with torch.no_grad():
            for n, value in load_trainable_state(checkpoint, model).items():
                dict(model.named_parameters())[n].copy_(value)
        grads = per_example_gradients_loop(model, batch, "causal_lm")
        moments = load_adam_moments(checkpoint, names)
        directions = torch.cat([adam_precondition(grads[n].reshape(3, -1).double(), moments[n][0].reshape(-1).double(),
                                                  moments[n][1].reshape(-1).double()) for n in names], dim=1)
        pi = projection_matrix(48, directions.shape[1], seed=t, dtype=torch.float64)
        projected = directions @ pi.T
        want = projected / projected.norm(dim=1, keepdim=True) * math.sqrt(weights[t])
        np.testing.assert_allclose(view[[0, 11, 22], t], want.numpy(), rtol=2e-4, atol=2e-5)


def test_interrupted_collection_resumes_bit_for_bit(pool, tmp_path):
    root, data, tokenizer, _ = pool
    kwargs = dict(tokenizer=tokenizer, checkpoints=root / "store" / "warmup", **COMMON)
    full = collect_trajectory(tiny_llama, data, tmp_path / "full", **kwargs)

    class Crash(RuntimeError):
        pass

    def crash_after_first(shard):
        raise Crash(f"injected failure after shard {shard}")

    with pytest.raises(Crash):
        collect_trajectory(tiny_llama, data, tmp_path / "part", on_shard_written=crash_after_first, **kwargs)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "part")
    resumed = collect_trajectory(tiny_llama, data, tmp_path / "part", **kwargs)
    for name in ["manifest.json"] + [s["file"] for s in full.manifest["shards"]]:
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert resumed.manifest == full.manifest
    # The in-kernel-generation path (no cached Pi) gives the same rows up to float32 rounding.
    uncached = collect_trajectory(tiny_llama, data, tmp_path / "uncached", projection_cache_mb=0, shards=[1], **kwargs)
    np.testing.assert_allclose(list(uncached.iter_shards())[0][2], list(full.iter_shards())[1][2], rtol=1e-4, atol=1e-6)
    with pytest.raises(StoreError, match="differs"):
        collect_trajectory(tiny_llama, data, tmp_path / "part", **{**kwargs, "d": 32})


def test_resume_after_the_data_changed_is_refused(pool, tmp_path):
    """Same ids, edited content: resuming would mix gradients of the old and new examples."""
    root, _, tokenizer, _ = pool
    kwargs = dict(tokenizer=tokenizer, checkpoints=root / "store" / "warmup", **COMMON)
    records = instruction_records(23, seed=1)
    data = write_jsonl(tmp_path / "data.jsonl", records)

    def crash_after_first(shard):
        raise RuntimeError(f"injected failure after shard {shard}")

    with pytest.raises(RuntimeError, match="injected"):
        collect_trajectory(tiny_llama, data, tmp_path / "part", on_shard_written=crash_after_first, **kwargs)
    edited = [dict(r) for r in records]
    edited[3]["response"] = "the quick brown fox"  # ex3 lies in shard 0 (rows 0..9), written already
    write_jsonl(data, edited)
    with pytest.raises(StoreError, match=r"cannot resume: shard 0 \(rows 0\.\.9, examples 'ex0'\.\.'ex9'\).*data file was edited"):
        collect_trajectory(tiny_llama, data, tmp_path / "part", **kwargs)
    assert open_store(tmp_path / "part", allow_incomplete=True).written_shards == [0]  # nothing written
    edited = [dict(r) for r in records]
    edited[21]["response"] = "the quick brown fox"  # ex21: shard 2, not written yet, so nothing mixes
    write_jsonl(data, edited)
    resumed = collect_trajectory(tiny_llama, data, tmp_path / "part", **kwargs)
    assert resumed.complete and all(len(s["input_sha256"]) == 64 for s in resumed.manifest["shards"])


def test_targets_then_select_writes_examples(pool, tmp_path):
    from gtp_kernels import select

    root, data, tokenizer, store = pool
    targets = write_jsonl(tmp_path / "val.jsonl", instruction_records(5, seed=9))
    val = collect_trajectory(tiny_llama, targets, tmp_path / "val", tokenizer=tokenizer,
                             checkpoints=root / "store" / "warmup", gradient_type="sgd", **COMMON)
    assert val.metadata["gradient_type"] == "sgd" and val.metadata["checkpoints"] == store.metadata["checkpoints"]
    k = 4
    selection = select(store.candidates(), val.mean(), k, checkpoint_weights=store.selection_checkpoint_weights)
    chosen = [store.ids[i] for i in selection.indices.tolist()]
    assert 1 <= len(chosen) <= k and len(set(chosen)) == len(chosen)
    residuals = np.asarray(selection.residual_norms)
    assert residuals[-1] < residuals[0]
    out = tmp_path / "selected.jsonl"
    assert write_selected_examples(data, chosen, out, weights=selection.weights.tolist()) == len(chosen)
    written = [json.loads(line) for line in open(out)]
    originals = {json.loads(line)["id"]: json.loads(line) for line in open(data)}
    assert [r["id"] for r in written] == chosen and [r["_rank"] for r in written] == list(range(len(chosen)))
    assert all(r["instruction"] == originals[r["id"]]["instruction"] for r in written)
    assert is_store(root / "store") and not is_store(root)
    with pytest.raises(ValueError, match="not in"):
        write_selected_examples(data, ["nope"], tmp_path / "bad.jsonl")


def test_classification_full_finetune_shared_seed(tmp_path):
    tokenizer = tiny_tokenizer(bert_style=True)
    records = classification_records(12, seed=4)
    warmup = WarmupSettings(fraction=0.5, epochs=2, learning_rate=1e-3, batch_size=3, lora=None)
    store = collect_trajectory(tiny_bert_classifier, records, tmp_path / "cls", tokenizer=tokenizer, task="classification",
                               warmup=warmup, seed_mode="shared", seed=7, normalise=False, apply_checkpoint_weights=False,
                               dtype="float16", **{**COMMON, "d": 16})
    assert store.dtype == np.float16 and store.metadata["projection"]["seeds"] == [7, 7]
    assert store.metadata["label2id"] == {"blue": 0, "green": 1, "red": 2}
    assert store.selection_checkpoint_weights == store.checkpoint_weights
    assert np.isfinite(store.candidates()).all() and np.abs(store.candidates()).max() > 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="gradient_type"):
        collect_trajectory(tiny_llama, [], tmp_path / "x", tokenizer=tiny_tokenizer(), gradient_type="sign")
    with pytest.raises(ValueError, match="no examples"):
        collect_trajectory(tiny_llama, [], tmp_path / "x", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="tokenizer"):
        collect_trajectory(tiny_llama, [{"text": "a"}], tmp_path / "x")


def test_foreign_peft_checkpoints_give_the_same_rows(pool, tmp_path):
    """Checkpoints as a transformers Trainer leaves them (peft adapter + torch optimizer state_dict +
    trainer_state.json) yield the rows our own warm-up folder gives for that checkpoint."""
    root, data, tokenizer, store = pool
    (ours,) = [c for c in load_checkpoints(root / "store" / "warmup") if c.name == "checkpoint-2"]
    model = wrap_for_training(tiny_llama(), "causal_lm", LORA)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for n, value in load_trainable_state(ours, model).items():
            dict(model.named_parameters())[n].copy_(value)
    folder = tmp_path / "trainer" / f"checkpoint-{ours.step}"
    model.save_pretrained(str(folder))
    moments = torch.load(root / "store" / "warmup" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    torch.save({"state": {i: {"exp_avg": moments["exp_avg"][n], "exp_avg_sq": moments["exp_avg_sq"][n]} for i, n in enumerate(names)},
                "param_groups": []}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": ours.step, "learning_rate": 1e-3}]}))
    foreign = collect_trajectory(tiny_llama, data, tmp_path / "foreign", tokenizer=tokenizer, checkpoints=tmp_path / "trainer",
                                 seed=1, **COMMON)
    assert foreign.t == 1 and foreign.metadata["learning_rates"] == [1e-3]
    want = np.asarray(store.trajectory_view()[:, 1], dtype=np.float64) / math.sqrt(store.checkpoint_weights[1])
    np.testing.assert_allclose(foreign.trajectory_view()[:, 0], want, rtol=1e-4, atol=1e-5)


def test_decoder_classifier_warmup_and_collection(tmp_path):
    """Warm-up (batches > 1) and collection of a Llama classifier whose config has no pad_token_id;
    then targets ("sgd", no normalisation) equal an independent projection of looped gradients."""
    tokenizer = tiny_tokenizer()
    records = classification_records(10, seed=6)
    warmup = WarmupSettings(fraction=0.5, epochs=2, learning_rate=1e-3, batch_size=3, lora=LoraSettings(r=2, alpha=4))
    store = collect_trajectory(decoder_classifier, records, tmp_path / "pool", tokenizer=tokenizer, task="classification",
                               warmup=warmup, **{**COMMON, "d": 16})
    assert (store.n, store.t, store.d) == (10, 2, 16)
    assert np.isfinite(store.candidates()).all() and np.abs(store.candidates()).max() > 0

    targets = collect_trajectory(decoder_classifier, records[:5], tmp_path / "val", tokenizer=tokenizer, task="classification",
                                 checkpoints=tmp_path / "pool" / "warmup", gradient_type="sgd", normalise=False,
                                 apply_checkpoint_weights=False, **{**COMMON, "d": 16})
    label2id = targets.metadata["label2id"]
    model = wrap_for_training(decoder_classifier(), "classification", LoraSettings(r=2, alpha=4)).eval()  # pad id unset
    tokens = tokenize_all(as_examples(records[:5]), tokenizer, "classification", label2id=label2id)
    batch = collate(tokens, pad_token_id(tokenizer))
    for t, checkpoint in enumerate(load_checkpoints(tmp_path / "pool" / "warmup")):
        with torch.no_grad():
            for n, value in load_trainable_state(checkpoint, model).items():
                dict(model.named_parameters())[n].copy_(value)
        grads = per_example_gradients_loop(model, batch, "classification")
        flat = torch.cat([g.reshape(5, -1).double() for g in grads.values()], dim=1)
        want = flat @ projection_matrix(16, flat.shape[1], seed=t, dtype=torch.float64).T
        np.testing.assert_allclose(np.asarray(targets.trajectory_view()[:, t], dtype=np.float64), want.numpy(), rtol=2e-4, atol=2e-5)


class _Rank:
    """A coordinator's hooks on one rank of a pretend group: rank 0's verdict is ``verdict``."""

    def __init__(self, rank, verdict=None):
        self.rank, self.verdict, self.offered = rank, verdict, []

    def wait_for_checkpoints(self):
        pass

    def checkpoints_ready(self):
        pass

    def decided_by_rank_0(self, value):
        self.offered.append(value)
        return value if self.rank == 0 else self.verdict

    def assign_shards(self, todo):
        return list(todo)


def test_rerun_on_a_finished_store_builds_no_model(pool, tmp_path, monkeypatch):
    """Nothing to write: the store comes back after the cheap checks, no model is built; any
    difference the checks see still raises what it raised before."""
    from gtp_kernels.collect import models

    root, _, tokenizer, _ = pool
    records = instruction_records(23, seed=1)
    data = write_jsonl(tmp_path / "data.jsonl", records)
    kwargs = dict(tokenizer=tokenizer, checkpoints=root / "store" / "warmup", **COMMON)

    def crash_after_first(shard):
        raise RuntimeError(f"injected failure after shard {shard}")

    with pytest.raises(RuntimeError, match="injected"):
        collect_trajectory(tiny_llama, data, tmp_path / "store", on_shard_written=crash_after_first, **kwargs)
    built = []
    real_build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **kw: built.append(1) or real_build(*a, **kw))
    part = collect_trajectory(tiny_llama, data, tmp_path / "store", shards=[0], **kwargs)  # shard 0 is written
    assert built == [] and part.written_shards == [0] and not part.complete
    full = collect_trajectory(tiny_llama, data, tmp_path / "store", **kwargs)
    assert len(built) == 1 and full.complete  # shards 1 and 2 were missing: one gradient model
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())

    again = collect_trajectory(tiny_llama, data, tmp_path / "store", **kwargs)
    assert len(built) == 1 and again.manifest == full.manifest
    np.testing.assert_array_equal(np.asarray(again.trajectory_view()), np.asarray(full.trajectory_view()))
    rank_0, rank_1 = _Rank(0), _Rank(1, verdict=True)
    assert collect_trajectory(tiny_llama, data, tmp_path / "store", coordinator=rank_0, **kwargs).complete
    assert collect_trajectory(tiny_llama, data, tmp_path / "store", coordinator=rank_1, **kwargs).complete
    assert len(built) == 1 and rank_0.offered == [True] and rank_1.offered == [False]  # only rank 0 looks

    with pytest.raises(StoreError, match="'d' differs"):
        collect_trajectory(tiny_llama, data, tmp_path / "store", **{**kwargs, "d": 32})
    # learning rates are part of the spec the writer compares: the full path raises as before
    with pytest.raises(StoreError, match="'metadata' differs"):
        collect_trajectory(tiny_llama, data, tmp_path / "store", learning_rates=[1e-3, 2e-3], **kwargs)
    assert len(built) == 2
    edited = [dict(r) for r in records]
    edited[21]["response"] = "the quick brown fox"
    write_jsonl(data, edited)
    with pytest.raises(StoreError, match=r"cannot resume: shard 2 .*data file was edited"):
        collect_trajectory(tiny_llama, data, tmp_path / "store", **kwargs)
    write_jsonl(data, records)
    # rank 0 says there is work: every rank takes the full path
    rank_1 = _Rank(1, verdict=False)
    with pytest.raises(StoreError, match="'metadata' differs"):
        collect_trajectory(tiny_llama, data, tmp_path / "store", coordinator=rank_1, learning_rates=[1e-3, 2e-3],
                           **kwargs)
    assert json.loads((tmp_path / "store" / "manifest.json").read_text()) == manifest  # nothing rewritten


def test_warmup_losses_reach_the_store_and_a_warning_once(pool, tmp_path):
    """The store records the warm-up's losses; targets on the same checkpoints record them too and
    stay compatible, also with targets on a copy of the warm-up written before losses were kept
    (no losses there: no key, no check). The pool's warm-up (the tiny Llama on random words at
    lr 5e-3) barely moves its loss: each collection on it warns once, on rank 0 only."""
    import shutil
    import warnings

    from gtp_kernels.collect import WarmupDidNotLearnWarning
    from gtp_kernels.collect.store import check_compatible

    root, _, tokenizer, store = pool
    manifest = json.loads((root / "store" / "warmup" / "warmup.json").read_text())
    losses = {"first_batch_loss": manifest["first_batch_loss"], "epoch_losses": manifest["epoch_losses"]}
    assert store.metadata["warmup_losses"] == losses and len(losses["epoch_losses"]) == store.t
    targets = write_jsonl(tmp_path / "val.jsonl", instruction_records(5, seed=9))
    kwargs = dict(tokenizer=tokenizer, gradient_type="sgd", **COMMON)
    with pytest.warns(WarmupDidNotLearnWarning, match="did not learn") as caught:
        val = collect_trajectory(tiny_llama, targets, tmp_path / "val", checkpoints=root / "store" / "warmup", **kwargs)
    assert len([w for w in caught if w.category is WarmupDidNotLearnWarning]) == 1
    assert val.metadata["warmup_losses"] == losses
    check_compatible(store, val)

    for rank, expected in ((_Rank(1, verdict=True), 0), (_Rank(0), 1)):  # the finished store: rank 0 decides
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            collect_trajectory(tiny_llama, targets, tmp_path / "val", checkpoints=root / "store" / "warmup",
                               coordinator=rank, **kwargs)
        assert len([w for w in caught if w.category is WarmupDidNotLearnWarning]) == expected, rank.rank

    old = tmp_path / "old" / "warmup"
    shutil.copytree(root / "store" / "warmup", old)
    (old / "warmup.json").write_text(json.dumps({k: v for k, v in manifest.items() if k not in losses}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", WarmupDidNotLearnWarning)
        old_val = collect_trajectory(tiny_llama, targets, tmp_path / "old_val", checkpoints=old, **kwargs)
    assert "warmup_losses" not in old_val.metadata
    check_compatible(store, old_val)
    np.testing.assert_array_equal(np.asarray(old_val.trajectory_view()), np.asarray(val.trajectory_view()))


def test_no_warning_for_a_causal_lm_that_started_far_below_chance(pool, tmp_path):
    """The pipeline passes the model's vocabulary (V = 44, the LM head's rows) to the check: a
    warm-up recorded as starting far below ln 44 = 3.78 and falling 5% (the quality study's
    pretrained chat model: 1.424 -> 1.347) does not warn, and the store records those losses;
    the same checkpoints recorded from a fresh start (3.80 -> 3.65, 4% lower) do."""
    import shutil
    import warnings

    from gtp_kernels.collect import WarmupDidNotLearnWarning

    root, _, tokenizer, _ = pool
    targets = write_jsonl(tmp_path / "val.jsonl", instruction_records(5, seed=9))
    kwargs = dict(tokenizer=tokenizer, gradient_type="sgd", **COMMON)
    for name, losses, warns in (("pretrained", {"first_batch_loss": 1.337, "epoch_losses": [1.424, 1.347]}, 0),
                                ("fresh", {"first_batch_loss": 3.80, "epoch_losses": [3.79, 3.65]}, 1)):
        folder = tmp_path / name / "warmup"
        shutil.copytree(root / "store" / "warmup", folder)
        manifest = json.loads((folder / "warmup.json").read_text())
        (folder / "warmup.json").write_text(json.dumps({**manifest, **losses}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            val = collect_trajectory(tiny_llama(), targets, tmp_path / name / "val", checkpoints=folder, **kwargs)
        flagged = [str(w.message) for w in caught if w.category is WarmupDidNotLearnWarning]
        assert val.metadata["warmup_losses"] == losses
        assert len(flagged) == warns, (name, flagged)
        if warns:
            assert "started at 1.00 x chance level ln(44)" in flagged[0], flagged
