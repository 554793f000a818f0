"""gtp less-select on a LESS-format fixture: LESS's folders in, LESS's score and selected-data files out.

The expected selection is recomputed here from LESS's documented scoring formula (Xia et al. 2024,
matching.py's docstring and README): per checkpoint the inner products of unit training rows with
the validation rows, weighted by the normalised checkpoint learning rates, averaged over each
sub-task's validation rows, maxed over sub-tasks; the best rows first. Computed in float64 here.
"""
import json

import pytest
import torch

from gtp_kernels.cli import main
from gtp_kernels.integrations.less import checkpoint_learning_rates

CKPTS = (105, 211, 317)
LRS = (2e-5, 1.1e-5, 3e-6)


def _unit(rows):
    return torch.nn.functional.normalize(rows, dim=1)


def _write_fixture(root, gen, d=16):
    """Two training files (30 and 20 examples) and two targets (3 sub-tasks x 4 rows; 1 x 5 rows)."""
    grads = root / "grads"
    data = {}
    for name, n in (("flan", 30), ("dolly", 20)):
        rows = [_unit(torch.randn(n, d, generator=gen)) for _ in CKPTS]
        for ckpt, r in zip(CKPTS, rows):
            folder = grads / f"{name}-ckpt{ckpt}-adam" / f"dim{d}"
            folder.mkdir(parents=True)
            if name == "flan":
                torch.save(r, folder / "all_orig.pt")
            else:  # shards, unnormalised: read as LESS's merge step would normalise them
                torch.save(r[:12] * 3.0, folder / "grads-12.pt")
                torch.save(r[12:] * 0.5, folder / "grads-20.pt")
        data[name] = rows
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"{name}-{i}", "text": f"example {i}"}) + "\n" for i in range(n)))
    targets = {}
    for task, n_val in (("tydiqa", 9 * 2), ("mytask", 5)):
        rows = [_unit(torch.randn(n_val, d, generator=gen)) for _ in CKPTS]
        for ckpt, r in zip(CKPTS, rows):
            folder = grads / f"{task}-ckpt{ckpt}-sgd" / f"dim{d}"
            folder.mkdir(parents=True)
            torch.save(r, folder / "all_orig.pt")
        targets[task] = rows
    train_dir = root / "out" / "checkpoint-317"
    train_dir.mkdir(parents=True)
    history = []
    for step in range(10, 318, 10):  # learning rates logged every 10 steps; per-epoch constant here
        lr = LRS[0] if step <= 105 else LRS[1] if step <= 211 else LRS[2]
        history.append({"step": step, "learning_rate": lr, "loss": 1.0})
    (train_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return grads, data, targets


def _less_formula(train_rows, target_rows, n_sub):
    w = torch.tensor(LRS, dtype=torch.float64)
    w = w / w.sum()
    per_ckpt = [a.double() @ v.double().T for a, v in zip(train_rows, target_rows)]  # (N, n_val) each
    score = sum(wt * s for wt, s in zip(w, per_ckpt))
    return score.reshape(score.shape[0], n_sub, -1).mean(-1).amax(-1)


def test_checkpoint_learning_rates_from_trainer_state(tmp_path):
    gen = torch.Generator().manual_seed(0)
    _write_fixture(tmp_path, gen)
    got = checkpoint_learning_rates(tmp_path / "out", list(CKPTS))
    assert got == pytest.approx(LRS, rel=1e-12)


def test_topk_reproduces_less_selection(tmp_path, capsys):
    gen = torch.Generator().manual_seed(1)
    grads, data, targets = _write_fixture(tmp_path, gen)
    out = tmp_path / "selected"
    rc = main(["less-select", "--grads", str(grads), "--train-file-names", "flan", "dolly",
               "--train-files", str(tmp_path / "flan.jsonl"), str(tmp_path / "dolly.jsonl"),
               "--target-task-names", "tydiqa", "mytask", "--out", str(out), "--percentage", "0.2",
               "--checkpoints", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    for task, n_sub in (("tydiqa", 9), ("mytask", 1)):
        expected = {name: _less_formula(data[name], targets[task], n_sub) for name in ("flan", "dolly")}
        for name, scores in expected.items():
            saved = torch.load(out / task / f"{name}_influence_score.pt", weights_only=True)
            assert saved.shape == scores.shape
            torch.testing.assert_close(saved.double(), scores, rtol=1e-5, atol=1e-6)
        pooled = torch.cat([expected["flan"], expected["dolly"]])
        best = torch.sort(pooled, descending=True).indices[:10].tolist()  # int(0.2 * 50) rows
        assert len(set(pooled[best].tolist())) == 10  # no ties: the order is unambiguous
        source = [("flan", i) for i in range(30)] + [("dolly", i) for i in range(20)]
        expected_lines = [json.dumps({"id": f"{source[i][0]}-{source[i][1]}", "text": f"example {source[i][1]}"})
                          for i in best]
        written = (out / task / "top_p0.2.jsonl").read_text().splitlines()
        assert written == expected_lines
        csv = (out / task / "sorted.csv").read_text().splitlines()
        assert csv[0] == "file name, index, score" and len(csv) == 51
        assert [tuple(x.strip() for x in line.split(",")[:2]) for line in csv[1:11]] == \
            [(source[i][0], str(source[i][1])) for i in best]


def test_gtp_method_writes_less_layout(tmp_path, capsys):
    gen = torch.Generator().manual_seed(2)
    grads, _, _ = _write_fixture(tmp_path, gen)
    out = tmp_path / "selected"
    rc = main(["less-select", "--grads", str(grads), "--train-file-names", "flan",
               "--train-files", str(tmp_path / "flan.jsonl"), "--target-task-names", "mytask",
               "--out", str(out), "--max-samples", "6", "--method", "gtp",
               "--checkpoint-weights", *map(str, LRS)])
    assert rc == 0, capsys.readouterr().err
    lines = (out / "mytask" / "top_num6.jsonl").read_text().splitlines()
    assert 1 <= len(lines) <= 6 and len(set(lines)) == len(lines)
    pool = set((tmp_path / "flan.jsonl").read_text().splitlines())
    assert set(lines) <= pool
    assert not (out / "mytask" / "flan_influence_score.pt").exists()  # topk only


def test_bad_input_is_one_line_error(tmp_path, capsys):
    gen = torch.Generator().manual_seed(3)
    grads, _, _ = _write_fixture(tmp_path, gen)
    rc = main(["less-select", "--grads", str(grads), "--train-file-names", "flan",
               "--train-files", str(tmp_path / "flan.jsonl"), "--target-task-names", "mytask",
               "--out", str(tmp_path / "o"), "--max-samples", "6", "--checkpoint-weights", "1", "2"])
    assert rc == 2
    assert "checkpoint weights: 2 for 3 checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
