"""The generic trainer never imports the embedded world (ShapesWorld), not even lazily or through
another module: only the places that choose the embedded default may. And the top-level folder
`kernels/` never stands in for Hugging Face's `kernels` package when the checkout is on sys.path."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"factrl.kernels": ROOT / "kernels", "factrl.model": ROOT / "model", "factrl.trainers": ROOT / "trainers"}
WORLD = "factrl.trainers.shapesworld"
# They choose the embedded default: building its data and tiny base, the pipeline, the eval stage's
# ShapesWorld sets, the experiment (the pipeline's stages over arms and seeds), and the CLI's
# `factrl data shapes`.
CHOOSERS = {"factrl.trainers.embedded", "factrl.trainers.pipeline", "factrl.trainers.eval_stage",
            "factrl.trainers.experiment", "factrl.trainers.cli"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = f.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *parts))
            mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, anywhere in the file (lazy imports in functions too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def test_generic_trainer_never_imports_the_world():
    mods = _modules()
    assert WORLD in mods and CHOOSERS <= set(mods), "layout changed: update this test"
    graph = {m: {i for i in _imports(m, p) if i in mods} for m, p in mods.items()}
    for m in mods:
        if m.startswith(WORLD) or m in CHOOSERS:
            continue
        seen, todo = set(), [m]
        while todo:  # the transitive closure of what importing m can import
            for i in graph[todo.pop()] - seen:
                seen.add(i)
                todo.append(i)
        bad = sorted(i for i in seen if i.startswith(WORLD) or i in CHOOSERS)
        assert not bad, f"{m} imports {bad}"


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from .shapesworld import scenes\n    import factrl.trainers.shapesworld.grammar\n")
    assert {"factrl.trainers.shapesworld", "factrl.trainers.shapesworld.scenes",
            "factrl.trainers.shapesworld.grammar"} <= _imports("factrl.trainers.m", f)


def _from_the_checkout(code: str, **env) -> subprocess.CompletedProcess:
    """``python -c code`` run in the checkout's root, which `-c` puts first on sys.path (as `python -m` does)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_kernels_folder_hands_its_name_to_the_installed_kernels_package(tmp_path):
    """Defect (CI, 2026-12-03): transformers 5.25 requires HF's `kernels` and imports it from
    `transformers.activations`; run from the checkout (`python -m pytest`), `import kernels` found our
    folder and every test that built a model failed on "cannot import name 'CUDAProperties'". A stand-in
    package after the checkout on sys.path plays the installed one, whatever transformers is installed."""
    site = tmp_path / "site" / "kernels"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("CUDAProperties = 'hub'\n")
    (site / "utils.py").write_text("WHERE = 'hub'\n")
    r = _from_the_checkout("import kernels, kernels.utils, factrl.kernels as ours\n"
                           "print(kernels.CUDAProperties, kernels.utils.WHERE, ours.NF4Weight.__name__)",
                           PYTHONPATH=str(tmp_path / "site"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hub", "hub", "NF4Weight"]


def test_transformers_imports_llava_from_the_checkout():
    """The same defect end to end with whatever transformers and `kernels` this venv has (importing the
    LLaVA class imports transformers.activations, where CI failed): where HF's `kernels` is not
    installed our folder stays an empty module, which transformers reads as absent."""
    r = _from_the_checkout("from transformers import LlavaForConditionalGeneration\n"
                           "import kernels\n"
                           "assert not hasattr(kernels, 'NF4Weight'), kernels.__file__")
    assert r.returncode == 0, r.stderr
