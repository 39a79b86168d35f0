"""The recipes qig-plugin ships: QIG recipes and their stock twins, as package data.

Found through :mod:`importlib.resources`, so they are there in a checkout and in an installed wheel alike.
"""

from importlib.resources import files
from pathlib import Path

__all__ = ["shipped_recipe", "shipped_recipes"]


def shipped_recipes() -> list[Path]:
    """Every shipped recipe YAML, sorted by name."""
    return sorted(Path(str(entry)) for entry in files(__name__).iterdir() if entry.name.endswith(".yaml"))


def shipped_recipe(name: str) -> Path:
    """The shipped recipe ``name`` (with or without ``.yaml``), e.g. ``qig_gptq_w8a8``.

    :raises FileNotFoundError: naming the shipped recipes, when there is none of that name
    """
    file_name = name if name.endswith(".yaml") else f"{name}.yaml"
    path = Path(str(files(__name__) / file_name))
    if not path.is_file():
        known = ", ".join(recipe.stem for recipe in shipped_recipes())
        raise FileNotFoundError(f"qig-plugin ships no recipe {name!r}; it ships {known}")
    return path
