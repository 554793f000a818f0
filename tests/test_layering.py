"""The package's import layering, read from the source with ``ast`` (nothing is imported).

Rules (every ``import``/``from ... import`` counts, at module level or inside a function):
  ops        gtp_kernels.ops imports nothing from gtp_kernels outside ops, except the leaf modules
             in OPS_MAY_IMPORT (error types and scalar checks that every layer shares).
  selection  gtp_kernels.selection imports nothing from api, cli or collect.
  cli        nothing in the package imports gtp_kernels.cli (only __main__, the entry point).
  private    no private name (one leading underscore, not a dunder) is imported from another
             gtp_kernels module, in the package, benchmarks/ or python/. Exempt: ``_C``, the
             compiled extension's handle, which ops._ext loads and the ops share. Modules whose
             names start with an underscore (ops._dispatch, ops._ext, ops._library,
             integrations._projector) are internal to the package, not to their file: the
             public names they define may be imported; their own underscore names may not.
             tests/ is not scanned (tests may reach into a module's internals).

KNOWN_VIOLATIONS lists violations accepted for a while (none since issue #15 merged). The
test fails on any violation not listed, and on any listed one that no longer exists, so the
list can only shrink, explicitly.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gtp_kernels"
OPS_MAY_IMPORT = {"gtp_kernels.validation"}
PRIVATE_NAME_EXEMPT = {"_C"}

KNOWN_VIOLATIONS: set = set()  # emptied when issue #15 merged; keep it empty


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path):
    """(imported module, imported name or None) for every import in the file, relative ones
    resolved against the file's package."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                yield source, alias.name


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(files, root: Path = ROOT):
    found = set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        me = _module_name(path, root)
        in_package = _within(me, PACKAGE)
        for source, name in _imports(path, root):
            if not _within(source, PACKAGE):
                continue
            target = f"{source}.{name}" if name else source
            if in_package and _within(me, "gtp_kernels.ops") and not _within(source, "gtp_kernels.ops"):
                if source not in OPS_MAY_IMPORT and target != PACKAGE + ".ops":
                    found.add(f"{rel}: ops imports {source}")
            if in_package and _within(me, "gtp_kernels.selection"):
                for banned in ("gtp_kernels.api", "gtp_kernels.cli", "gtp_kernels.collect"):
                    if _within(target, banned):
                        found.add(f"{rel}: selection imports {banned}")
            if in_package and me != "gtp_kernels.__main__" and _within(target, "gtp_kernels.cli"):
                found.add(f"{rel}: imports gtp_kernels.cli")
            if name and _is_private(name) and name not in PRIVATE_NAME_EXEMPT and source != me:
                found.add(f"{rel}: private {source}.{name}")
    return found


def _scanned_files():
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    for folder in ("benchmarks", "python"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_no_new_layering_violations():
    new = violations(_scanned_files()) - KNOWN_VIOLATIONS
    assert not new, "new import-layering violations (see this module's docstring):\n" + "\n".join(sorted(new))


def test_known_violations_still_exist_so_the_list_only_shrinks():
    gone = KNOWN_VIOLATIONS - violations(_scanned_files())
    assert not gone, "fixed violations: remove them from KNOWN_VIOLATIONS:\n" + "\n".join(sorted(gone))


def test_the_rules_catch_each_kind_of_violation(tmp_path):
    """The checker itself: one file per rule, in a scratch copy of the layout."""
    sources = {
        "gtp_kernels/ops/bad.py": "from ..selection import pursuit\nfrom ..validation import InputError\n"
                                  "from ._ext import _C\nfrom . import philox\n",
        "gtp_kernels/selection/bad.py": "from ..api import select\nimport gtp_kernels.collect.store\n",
        "gtp_kernels/demo.py": "def f():\n    from .cli import main\n",
        "gtp_kernels/__main__.py": "from .cli import main\n",
        "gtp_kernels/compat/bad.py": "from ..files import _split_key, __all__\n",
        "benchmarks/b.py": "from gtp_kernels.collect.pipeline import _Projector\nfrom os import _exit\n",
    }
    for rel, text in sources.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert violations(sorted(tmp_path.rglob("*.py")), tmp_path) == {
        "gtp_kernels/ops/bad.py: ops imports gtp_kernels.selection",
        "gtp_kernels/selection/bad.py: selection imports gtp_kernels.api",
        "gtp_kernels/selection/bad.py: selection imports gtp_kernels.collect",
        "gtp_kernels/demo.py: imports gtp_kernels.cli",
        "gtp_kernels/compat/bad.py: private gtp_kernels.files._split_key",
        "benchmarks/b.py: private gtp_kernels.collect.pipeline._Projector",
    }
