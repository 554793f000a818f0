"""bergson gradient indexes -> trajectory store (gtp_kernels.integrations.bergson), with the real bergson on CPU.

bergson is installed with --no-deps (its torchvision/torchaudio/bitsandbytes/torchopt requirements would
replace torch); building an index needs none of them.
"""
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("bergson", reason="bergson not installed (pip install --no-deps bergson, see .ci/run)")

from datasets import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from bergson import GradientProcessor, IndexConfig, collect_gradients, load_gradients  # noqa: E402

from gtp_kernels.collect import open_store  # noqa: E402
from gtp_kernels.integrations.bergson import bergson_to_store, read_bergson_index  # noqa: E402
from gtp_kernels.validation import InputError  # noqa: E402


def _build_index(model, path):
    # an id column besides input_ids: bergson drops input_ids from its saved data.hf and cannot add
    # its loss column to a dataset left with no columns
    data = Dataset.from_dict({"id": ["a", "b", "c", "d", "e"],
                              "input_ids": [[1, 2, 3, 4, 5], [6, 7, 8, 9], [3, 3, 4], [5, 9, 9, 1, 2, 7], [4, 4]]})
    cfg = IndexConfig(run_path=str(path), projection_dim=4)
    collect_gradients(model, data, GradientProcessor(projection_dim=4), cfg)
    shutil.move(cfg.partial_run_path, path)  # what bergson's build command does once collection is done
    return path


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bergson")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=12, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    first = _build_index(model, root / "ckpt-0")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return [first, _build_index(model, root / "ckpt-1")]


def test_store_holds_bergsons_gradients(two_checkpoints, tmp_path):
    store = bergson_to_store(two_checkpoints, tmp_path / "store", checkpoint_weights=[1, 3],
                             example_ids=list("abcde"))
    theirs = [torch.from_numpy(np.array(load_gradients(i))) for i in two_checkpoints]
    assert theirs[0].shape[0] == 5 and bool((theirs[0] != 0).any())
    assert not torch.equal(theirs[0], theirs[1])  # the two checkpoints differ
    reopened = open_store(tmp_path / "store")
    trajectory = torch.from_numpy(np.array(reopened.trajectory_view()))
    assert trajectory.shape == (5, 2, theirs[0].shape[1])
    for t in range(2):
        torch.testing.assert_close(trajectory[:, t], theirs[t], rtol=0, atol=0)
    assert list(reopened.ids) == list("abcde")
    meta = reopened.metadata
    assert meta["source"] == "bergson" and meta["checkpoint_weights"] == [0.25, 0.75]
    assert meta["projection"]["library"] == "bergson" and meta["projection"]["projection_dim"] == 4
    assert list(meta["modules"]) == list(json.loads((two_checkpoints[0] / "info.json").read_text())["grad_sizes"])
    assert store.n == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_index(two_checkpoints, tmp_path, dtype):
    index = tmp_path / "half"
    shutil.copytree(two_checkpoints[0], index)
    info = json.loads((index / "info.json").read_text())
    full, _ = read_bergson_index(two_checkpoints[0])
    half = full.to(dtype)
    bits = half.view(torch.int16).numpy() if dtype == torch.bfloat16 else half.numpy()
    bits.tofile(index / "gradients.bin")
    info["base_dtype"] = str(dtype).removeprefix("torch.")
    (index / "info.json").write_text(json.dumps(info))
    rows, _ = read_bergson_index(index)
    torch.testing.assert_close(rows, half.float(), rtol=0, atol=0)


def test_bad_indexes(two_checkpoints, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(two_checkpoints[0], broken)
    with open(broken / "gradients.bin", "r+b") as f:
        f.truncate(12)
    with pytest.raises(InputError, match="gradients.bin has 12 bytes"):
        bergson_to_store([broken], tmp_path / "s1")
    per_token = tmp_path / "tokens"
    shutil.copytree(two_checkpoints[0], per_token)
    info = json.loads((per_token / "info.json").read_text())
    (per_token / "info.json").write_text(json.dumps({**info, "attribute_tokens": True}))
    with pytest.raises(InputError, match="per-token"):
        bergson_to_store([per_token], tmp_path / "s2")
    with pytest.raises(InputError, match="checkpoint_weights"):
        bergson_to_store(two_checkpoints, tmp_path / "s3", checkpoint_weights=[1])
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s3").exists()
