"""The documentation site's completeness: every page in the navigation, every public module in the API reference,
every public class and function with a docstring that carries an example, every recipe on the recipe page.

The build itself (broken links and anchors, unparseable docstrings) is ``make docs`` (``mkdocs build --strict``),
which ``make test`` runs before pytest.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import lightning_memopt
from lightning_memopt.recipes import list_recipes

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Modules with an __all__ that are not API: version shims, the benchmark and self-check programs (their interface is
# the command line, documented in docs/benchmarks.md), the module behind `python -m lightning_memopt`.
INTERNAL = (
    "lightning_memopt.compat",
    "lightning_memopt.selfcheck",
    "lightning_memopt.bench",
    "lightning_memopt.__main__",
)
EXAMPLE = re.compile(r"^\s*Examples?\b[^\n]*::?\s*$", re.MULTILINE)


def _nav_pages(entries: list) -> list[str]:
    pages: list[str] = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def _reference_modules() -> list[str]:
    modules = []
    for page in sorted((DOCS / "reference").glob("*.md")):
        modules += re.findall(r"^::: ([\w.]+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
    return modules


def _modules_with_all() -> list[str]:
    names = ["lightning_memopt"]
    names += [m.name for m in pkgutil.walk_packages(lightning_memopt.__path__, "lightning_memopt.")]
    found = []
    for name in names:
        if name.startswith(INTERNAL):
            continue
        if hasattr(importlib.import_module(name), "__all__"):
            found.append(name)
    return found


def test_the_navigation_lists_every_page_and_only_pages_that_exist() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), "a page is listed twice in mkdocs.yml's nav"
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == on_disk


def test_every_public_module_is_in_the_api_reference() -> None:
    referenced = _reference_modules()
    assert len(referenced) == len(set(referenced)), "a module is rendered twice in docs/reference/"
    for name in referenced:
        importlib.import_module(name)  # a misspelt `::: module` fails here too, not only in the build
    public = set(_modules_with_all()) - {"lightning_memopt"}

    # a module is in the reference when a page renders it, or renders every class and function it exports (a
    # package's re-exports, rendered where they are defined); objects compared by identity, classes and functions
    # only (small ints and strings are shared objects: an equal constant elsewhere would count as rendered)
    def exported(module_name: str) -> list[object]:
        module = importlib.import_module(module_name)
        objects = [getattr(module, n) for n in module.__all__]
        return [o for o in objects if inspect.isclass(o) or inspect.isfunction(o)]

    rendered = {id(obj) for name in referenced for obj in exported(name)}

    def covered(name: str) -> bool:
        objects = exported(name)
        return bool(objects) and all(id(obj) in rendered for obj in objects)

    missing = sorted(name for name in public - set(referenced) if not covered(name))
    assert not missing, f"add `::: NAME` to a page in docs/reference/ (or to INTERNAL here) for: {missing}"
    # the package's own names are rendered where they are defined
    for name in lightning_memopt.__all__:
        obj = getattr(lightning_memopt, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ in referenced or obj.__module__.rsplit(".", 1)[0] in referenced, name


def _public_objects() -> dict[str, object]:
    objects: dict[str, object] = {}
    for module_name in ["lightning_memopt", *_reference_modules()]:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not obj.__module__.startswith("lightning_memopt"):
                continue  # a re-exported torch or Lightning name: documented there
            objects.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    return objects


def test_every_public_class_and_function_has_a_docstring_with_an_example() -> None:
    objects = _public_objects()
    assert len(objects) > 150  # the walk found the API, not an empty list
    no_docstring = sorted(name for name, obj in objects.items() if not inspect.getdoc(obj))
    no_example = sorted(
        name for name, obj in objects.items() if inspect.getdoc(obj) and not EXAMPLE.search(inspect.getdoc(obj) or "")
    )
    assert not no_docstring, f"no docstring: {no_docstring}"
    assert not no_example, f"no `Example::` section: {no_example}"


def test_the_check_catches_a_docstring_without_an_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lightning_memopt.partition, "__doc__", "Split a model into blocks.")
    with pytest.raises(AssertionError, match=r"lightning_memopt\.blocks\.partition"):
        test_every_public_class_and_function_has_a_docstring_with_an_example()


def test_the_recipe_page_shows_every_shipped_recipe() -> None:
    page = (DOCS / "recipe-files.md").read_text(encoding="utf-8")
    included = re.findall(r'^--8<-- "lightning_memopt/recipes/([\w.-]+)\.yaml"$', page, re.MULTILINE)
    assert included == list_recipes()
    table = (DOCS / "recipes.md").read_text(encoding="utf-8")
    for name in list_recipes():
        assert f"`{name}.yaml`" in table, f"docs/recipes.md's table does not describe {name}.yaml"


def test_the_home_page_includes_what_exists_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for section in re.findall(r'^--8<-- "README\.md:(\w+)"$', (DOCS / "index.md").read_text(), re.MULTILINE):
        assert f"<!-- --8<-- [start:{section}] -->" in readme
        assert f"<!-- --8<-- [end:{section}] -->" in readme
