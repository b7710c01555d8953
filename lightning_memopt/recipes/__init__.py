"""The recipes that ship inside the package: LightningCLI YAML files, one per documented use.

They are package data (``lightning_memopt/recipes/*.yaml``); the repository's top-level ``recipes/`` is a link to
this folder, so there is one copy. ``lightning-memopt recipes`` lists them, ``lightning-memopt recipes copy NAME DIR``
writes one out to edit, and ``lightning-memopt fit --config PATH`` runs it.

Example::

    >>> from lightning_memopt.recipes import copy_recipe, list_recipes
    >>> "quickstart" in list_recipes()
    True
    >>> path = copy_recipe("quickstart", "my-run")  # doctest: +SKIP
    >>> # lightning-memopt fit --config my-run/quickstart.yaml
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RecipeError", "copy_recipe", "list_recipes", "main", "recipe_description", "recipe_path"]

_FOLDER = Path(__file__).resolve().parent


class RecipeError(ValueError):
    """An unknown recipe name, or a copy that would overwrite a file.

    Example::

        >>> from lightning_memopt.recipes import RecipeError, recipe_path
        >>> try:
        ...     recipe_path("quickstrat")
        ... except RecipeError as error:
        ...     print("did you mean 'quickstart'" in str(error))
        True
    """


def list_recipes() -> list[str]:
    """The names of the shipped recipes (file names without ``.yaml``), sorted.

    Example::

        >>> from lightning_memopt.recipes import list_recipes
        >>> list_recipes()[-1]
        'quickstart'
    """
    return sorted(path.stem for path in _FOLDER.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The installed file of recipe ``name`` (``"quickstart"`` or ``"quickstart.yaml"``).

    Raises :class:`RecipeError` naming the shipped recipes (and the closest one) when there is no such recipe.

    Example::

        >>> from lightning_memopt.recipes import recipe_path
        >>> recipe_path("quickstart").name
        'quickstart.yaml'
    """
    stem = name.removesuffix(".yaml")
    path = _FOLDER / f"{stem}.yaml"
    if "/" in stem or "\\" in stem or not path.is_file():
        import difflib

        names = list_recipes()
        close = difflib.get_close_matches(stem, names, n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise RecipeError(
            f"No recipe named {name!r}{hint} The shipped recipes are: {', '.join(names)} "
            "(`lightning-memopt recipes` lists them)."
        )
    return path


def recipe_description(name: str) -> str:
    """The first sentence of recipe ``name``'s leading comment: what it is for.

    Example::

        >>> from lightning_memopt.recipes import recipe_description
        >>> recipe_description("quickstart")
        'Quick check on a laptop CPU (about 3 minutes on 2 cores)'
    """
    words: list[str] = []
    for line in recipe_path(name).read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text:
            break
        words.append(text)
    first = re.split(r"(?<=[.:])\s", " ".join(words), maxsplit=1)[0]
    return first.rstrip(".:")


def copy_recipe(name: str, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write recipe ``name`` into ``directory`` (created if missing) to edit and run; returns the new file's path.

    An existing file of the same name is left alone (:class:`RecipeError`) unless ``overwrite=True``.

    Example::

        >>> from lightning_memopt.recipes import copy_recipe
        >>> copy_recipe("llama3-8b-badam-sft", "configs")  # doctest: +SKIP
        PosixPath('configs/llama3-8b-badam-sft.yaml')
    """
    source = recipe_path(name)
    target = Path(directory) / source.name
    if target.exists() and not overwrite:
        raise RecipeError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-memopt recipes [copy NAME DIR [--overwrite]]``: list the shipped recipes, or copy one out.

    Returns the exit status (0, or 2 with a message on stderr for an unknown name or an existing file).

    Example::

        >>> from lightning_memopt.recipes import main
        >>> main(["copy", "quickstart", "configs"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(
        prog="lightning-memopt recipes",
        description="List the recipes that ship with lightning-memopt, or copy one out to edit.",
    )
    commands = parser.add_subparsers(dest="command")
    copy = commands.add_parser("copy", help="write a recipe into a directory")
    copy.add_argument("name", help="a recipe name, as listed by `lightning-memopt recipes`")
    copy.add_argument("directory", nargs="?", default=".", help="where to write it (default: here)")
    copy.add_argument("--overwrite", action="store_true", help="replace an existing file of the same name")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "copy":
        try:
            target = copy_recipe(args.name, args.directory, overwrite=args.overwrite)
        except RecipeError as error:
            print(f"lightning-memopt recipes: {error}", file=sys.stderr)
            return 2
        print(f"wrote {target}; run it with: lightning-memopt fit --config {target}")
        return 0
    width = max(map(len, list_recipes()))
    for name in list_recipes():
        print(f"{name:<{width}}  {recipe_description(name)}")
    print("\nCopy one to edit: lightning-memopt recipes copy NAME DIR")
    return 0
