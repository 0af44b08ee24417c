"""mypy over the package as it installs: ``tierpick.classifier`` is ``classifier/``, and so on
(pyproject's ``package-dir``). mypy cannot follow setuptools' editable finder, so each module
is handed to it under its installed name (``make check`` runs this; settings: pyproject)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.main import process_options
from mypy.modulefinder import BuildSource

REPO = Path(__file__).resolve().parent.parent


def sources() -> list[BuildSource]:
    """Every module under the mapped folders (the wheel's, and the checkout-only harnesses),
    under its installed name: a stub where one exists."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found: dict[str, Path] = {}
    for package, folder in setuptools["package-dir"].items():
        for path in sorted((REPO / folder).rglob("*.py*")):
            if path.suffix not in (".py", ".pyi") or "__pycache__" in path.parts:
                continue
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join(
                [package, *parts[:-1], *([] if parts[-1] == "__init__" else parts[-1:])]
            )
            if path.suffix == ".pyi" or name not in found:
                found[name] = path
    return [BuildSource(str(path.relative_to(REPO)), name) for name, path in found.items()]


def main() -> int:
    files, options = process_options(["--config-file", str(REPO / "pyproject.toml"), "-c", ""])
    del files
    try:
        result = build.build(sources=sources(), options=options)
    except CompileError as exc:
        print("\n".join(exc.messages))
        return 2
    for line in result.errors:
        print(line)
    count = len(result.errors)
    print(f"Found {count} errors" if count else f"Success: no issues in {len(sources())} modules")
    return 1 if count else 0


if __name__ == "__main__":
    sys.exit(main())
