"""The package's import layers: every module imports only modules below it, so there is no
import circle (not even one hidden in a function) and data flows one way.

The layers, lowest first; inside a layer a module may import those listed before it.
docs/architecture.md draws the same diagram.
"""

import ast
import importlib
import os
import pkgutil

import pytest

import vq_draw

LAYERS = [
    ("basics", ["files", "devices", "arguments", "data", "images", "losses", "nn", "reference",
                "settings", "signals"]),
    ("model", ["refiners", "train_step", "encoder", "config"]),
    ("model files", ["codec", "rate_distortion", "checkpoint", "convert", "loading", "export",
                     "evaluate"]),
    ("training", ["distributed", "run_folder", "train_log", "train_state", "train", "train_cli",
                  "experiments"]),
    ("commands", ["cli", "__main__", "tools", "tools.compare_log", "tools.bench_speed",
                  "tools.bench_memory", "tools.bench_loop", "tools.bench", "tools.profile_step",
                  "tools.grad_scale", "tools.make_images", "tools.notebooks", "tools.pack_data",
                  "tools.step_probe", "tools.gpu_check_train", "tools.gpu_check_results", "tools.gpu_check",
                  ""]),  # "": the package itself, vq_draw/__init__.py
]
ORDER = [name for _, names in LAYERS for name in names]
PACKAGE_DIR = os.path.dirname(vq_draw.__file__)


def all_modules():
    """Every module of the package, as its name under vq_draw ("" for the package)."""
    return [""] + [info.name[len("vq_draw."):]
                   for info in pkgutil.walk_packages(vq_draw.__path__, prefix="vq_draw.")]


def source_path(name, root=PACKAGE_DIR):
    path = os.path.join(root, *name.split(".")) if name else root
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


def package_imports(name, root=PACKAGE_DIR):
    """The vq_draw modules that module ``name`` imports anywhere in its code (also inside
    functions), as names under vq_draw."""
    path = source_path(name, root)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".") if package else []
            base = parts[:len(parts) - (node.level - 1)]
            if node.module:
                found.add(".".join(base + node.module.split(".")))
            else:  # from . import codec
                found.update(".".join(base + [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vq_draw"):
            found.add(node.module[len("vq_draw."):] if node.module != "vq_draw" else "")
        elif isinstance(node, ast.Import):
            found.update(alias.name[len("vq_draw."):] for alias in node.names
                         if alias.name.startswith("vq_draw."))
    found.discard(name)
    return found


def test_every_module_has_a_layer():
    assert sorted(all_modules()) == sorted(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_imports_point_only_downward(name):
    if name != "__main__":  # which would run the command line
        importlib.import_module("vq_draw" + (f".{name}" if name else ""))
    for target in sorted(package_imports(name)):
        assert target in ORDER, f"vq_draw.{name} imports vq_draw.{target}, which is not a module"
        assert ORDER.index(target) < ORDER.index(name), \
            f"vq_draw.{name} imports vq_draw.{target}, which is not below it ({LAYERS})"


def test_the_check_finds_a_lazy_import_upward(tmp_path):
    """The check itself: an import inside a function counts, and "from . import x" too."""
    (tmp_path / "checkpoint.py").write_text("from . import files\n\n\ndef f():\n"
                                            "    from .convert import x\n")
    assert package_imports("checkpoint", str(tmp_path)) == {"convert", "files"}
    assert ORDER.index("convert") > ORDER.index("checkpoint") > ORDER.index("files")
