"""The package boundaries of ARCHITECTURE.md, checked on the source: the runtime never imports
training or torch, and serving never imports training."""

import ast

import pytest

from tests.conftest import REPO


def _imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {(str(path.relative_to(REPO)), a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((str(path.relative_to(REPO)), node.module.split(".")[0]))
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # mlflow is imported lazily, only to resolve a models:/ URI; test_runtime checks that a
        # plain load imports none of these
        ("classifier", {"training", "torch", "transformers", "sentence_transformers"}),
        ("serving", {"training", "torch", "transformers", "sentence_transformers"}),
    ],
)
def test_package_does_not_import(package: str, forbidden: set[str]) -> None:
    bad = sorted((f, m) for f, m in _imports(package) if m in forbidden)
    assert not bad, f"{package} imports {bad}"


def test_public_surface_of_classifier() -> None:
    import classifier

    assert sorted(classifier.__all__) == [
        "ArtifactError",
        "ConfigError",
        "DatasetError",
        "Decision",
        "IngestError",
        "Manifest",
        "MissingDependencyError",
        "PolicyError",
        "PromptError",
        "Router",
        "RoutingPolicy",
        "TierClassifier",
        "TierSpec",
        "TierpickError",
        "load",
        "messages_to_prompt",
        "normalize_prompt",
        "prepare_prompt",
        "prompt_key",
        "read_manifest",
    ]
