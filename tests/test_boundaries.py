"""The package boundaries of ARCHITECTURE.md, checked on the source: the runtime never imports
training or torch, and serving never imports training."""

import ast
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO


def _top(module: str) -> str:
    """The package an import names: ``tierpick.training.x`` -> ``training``, ``torch.nn`` ->
    ``torch``; a bare ``classifier``/``training``/``serving`` stays as it is (and is refused)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "tierpick" and len(parts) > 1 else parts[0]


def _imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {(str(path.relative_to(REPO)), _top(a.name)) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "tierpick":  # from tierpick import classifier
                    found |= {(str(path.relative_to(REPO)), a.name) for a in node.names}
                else:
                    found.add((str(path.relative_to(REPO)), _top(node.module)))
    return found


def _raw_modules(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found |= {(str(path.relative_to(REPO)), n) for n in names}
    return found


@pytest.mark.parametrize("package", ["classifier", "training", "serving", "tests", "tierpick"])
def test_every_import_names_the_installed_package(package: str) -> None:
    """The three folders install as tierpick.classifier, tierpick.training, tierpick.serving:
    importing them by their folder names would load a second copy of every module."""
    bare = sorted(
        (f, m)
        for f, m in _raw_modules(package)
        if m.split(".")[0] in ("classifier", "training", "serving") and "/_proto/" not in f
    )
    assert not bare, bare


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # mlflow is imported lazily, only to resolve a models:/ URI; test_runtime checks that a
        # plain load imports none of these
        ("classifier", {"training", "torch", "transformers", "sentence_transformers"}),
        ("serving", {"training", "torch", "transformers", "sentence_transformers"}),
        ("training", {"serving"}),
    ],
)
def test_package_does_not_import(package: str, forbidden: set[str]) -> None:
    bad = sorted((f, m) for f, m in _imports(package) if m in forbidden)
    assert not bad, f"{package} imports {bad}"


def test_the_package_root_is_the_runtime_and_the_cli() -> None:
    """``import tierpick`` gives the runtime's public surface, nothing of training or serving
    (so it works on a runtime-only install); the CLI dispatcher is the only module that names
    the command groups of every package."""
    import tierpick
    from tierpick import classifier

    assert set(tierpick.__all__) == {*classifier.__all__, "__version__"}
    found = _imports("tierpick")
    root = {m for f, m in found if f == "tierpick/__init__.py"}
    assert root <= {"classifier", "__future__", "importlib"}, root
    assert not {m for f, m in found if f == "tierpick/cli.py"} & {"training", "serving"}


def test_public_surface_of_classifier() -> None:
    from tierpick import classifier

    assert sorted(classifier.__all__) == [
        "ArtifactError",
        "ConfigError",
        "Decision",
        "Manifest",
        "MissingDependencyError",
        "NotClassifiable",
        "PolicyError",
        "PromptError",
        "RequestError",
        "Router",
        "RoutingPolicy",
        "TierClassifier",
        "TierSpec",
        "TierpickError",
        "conversation_text",
        "last_user_text",
        "load",
        "messages_to_prompt",
        "normalize_prompt",
        "prepare_prompt",
        "prompt_key",
        "read_manifest",
        "read_policy",
        "strip_harness",
        "write_policy",
    ]


@pytest.mark.parametrize("package", ["classifier", "training", "serving", "tierpick"])
def test_no_package_imports_another_packages_private_module(package: str) -> None:
    """A leading underscore means "this package's own": other packages go through the public
    modules (``tierpick.classifier.runtime``, ``.text``, ...), so a private module can change."""
    bad = []
    for f, m in _raw_modules(package):
        parts = m.split(".")
        if parts[0] != "tierpick" or len(parts) < 3 or parts[1] == package:
            continue
        if any(p.startswith("_") for p in parts[2:]):
            bad.append((f, m))
    assert not bad, sorted(bad)


# serving's layout, in the order of its one-way flow: the shared lifecycle and decision log, then
# the jobs (the service, the gateway, scoring with report, tune and label on it), which never
# import each other; the CLI and the benchmark sit on top and may use any of them.
SERVING_LAYERS = {
    "lifecycle": set(),
    "decisions": set(),
    "conversations": set(),
    "guard": set(),
    "service": {"lifecycle", "decisions", "conversations", "guard", "_convert", "_proto"},
    "gateway": {"lifecycle", "decisions", "conversations", "guard"},
    "scoring": set(),
    "report": {"scoring"},
    "tune": {"scoring", "report"},
    "label": {"scoring"},
    "client": {"_proto"},
}


@pytest.mark.parametrize("job", sorted(SERVING_LAYERS))
def test_serving_modules_import_only_down_the_flow(job: str) -> None:
    allowed = SERVING_LAYERS[job] | {job}
    bad = []
    for f, m in _raw_modules("serving"):
        name = f.removeprefix("serving/").removesuffix(".py").split("/")[0]
        parts = m.split(".")
        if name != job or parts[:2] != ["tierpick", "serving"] or len(parts) < 3:
            continue
        if parts[2] not in allowed:
            bad.append((f, m))
    assert not bad, sorted(bad)


def test_no_module_imports_itself_through_others() -> None:
    """Imports inside functions count too: they hid a cycle (training.pipeline ran the folds,
    training.loso imported the pipeline's fitting back)."""
    graph: dict[str, set[str]] = {}
    for package in ("classifier", "training", "serving"):
        for path in (REPO / package).rglob("*.py"):
            if "_proto" in path.parts:
                continue
            rel = path.relative_to(REPO).with_suffix("")
            name = "tierpick." + ".".join(p for p in rel.parts if p != "__init__")
            deps = graph.setdefault(name, set())
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.level == 0
                    and (node.module or "").startswith("tierpick.")
                ):
                    deps.add(str(node.module))
    modules = set(graph)
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep not in modules:
                continue
            if dep in path:
                cycles.append([*path[path.index(dep) :], dep])
            elif len(path) < 12:
                visit(dep, [*path, dep])

    for module in sorted(modules):
        visit(module, [module])
    # a package's __init__ re-exporting its modules is not a cycle of code
    real = [c for c in cycles if not any(m.count(".") == 1 for m in c)]
    assert not real, sorted({" -> ".join(c) for c in real})[:5]


def _setuptools() -> dict[str, Any]:
    import tomllib

    found: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]
    return found


CHECKOUT_ONLY = {"tierpick.serving.harness"}  # the harnesses: run from a checkout, not shipped


def test_the_wheel_lists_every_folder_of_code_and_no_symlink_is_needed() -> None:
    """The package is mapped, not linked: every folder with an ``__init__.py`` under a mapped
    folder is a listed package (the harnesses excepted), every listed package is a folder, and
    no file of the checkout is a symlink."""
    cfg = _setuptools()
    found = set()
    for package, folder in cfg["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            if package == "tierpick" and rel:
                continue  # tierpick/ holds the root only
            found.add(".".join([package, *rel]))
    listed = set(cfg["packages"])
    assert found - CHECKOUT_ONLY <= listed, sorted(found - CHECKOUT_ONLY - listed)
    assert not listed & CHECKOUT_ONLY
    for package in listed:
        root = max((p for p in cfg["package-dir"] if package.startswith(p)), key=len)
        folder = REPO / cfg["package-dir"][root] / Path(*package[len(root) + 1 :].split("."))
        assert folder.is_dir(), package
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-s"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert not [line for line in tracked if line.startswith("120000")]  # git's symlink mode


def test_nothing_shipped_imports_the_harnesses() -> None:
    """Only the CLI's ``bench`` (which says so when they are missing) and tests import them."""
    bad = sorted(
        (f, m)
        for package in ("classifier", "training", "serving", "tierpick")
        for f, m in _raw_modules(package)
        if m.startswith("tierpick.serving.harness")
        and not f.startswith("serving/harness/")
        and f != "serving/cli.py"
    )
    assert not bad, bad
