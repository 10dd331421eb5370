"""Which recipes and config folders exist, found without importing torch (for `ls`).

A recipe is any subclass of `FinetuneModule` defined in `lightning_tune/recipes/` (read from the
source with `ast`, not imported) or registered by an installed package under the
`lightning_tune.recipes` entry-point group (`MyRecipe = "my_pkg.recipes:MyRecipe"`, listed from
the package metadata, not imported). Config folders are those `--config NAME` searches.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from lightning_tune.cli.parser import CONFIG_DIR, CONFIG_ENTRY_POINTS, CONFIG_PATH_ENV, entry_point_config_dirs, env_config_dirs

MODULES_DIR = Path(__file__).resolve().parents[1] / "recipes"
BASE_RECIPE = "FinetuneModule"
RECIPE_ENTRY_POINTS = "lightning_tune.recipes"


@dataclass(frozen=True)
class Recipe:
    name: str  # the class name
    path: str  # what `class_path:` takes
    summary: str  # first line of the class docstring, or where it comes from


def _classes(path: Path) -> dict[str, tuple[list[str], str]]:
    """{class name: (base names, first docstring line)} of one source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases]
            doc = (ast.get_docstring(node) or "").strip().splitlines()
            out[node.name] = (bases, doc[0] if doc else "")
    return out


def _exported(init: Path) -> set[str]:
    """Names `lightning_tune/recipes/__init__.py` imports, i.e. those `lightning_tune.recipes.X` reaches."""
    tree = ast.parse(init.read_text(encoding="utf-8"))
    return {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names}


def _top_level(init: Path) -> set[str]:
    """Names the package's lazy map (`_EXPORTS` in lightning_tune/__init__.py) gives as `lightning_tune.X`."""
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
    return set()


def bundled_recipes() -> list[Recipe]:
    """Subclasses (direct or not) of the base recipe defined in lightning_tune/recipes/*.py."""
    found: dict[str, tuple[str, list[str], str]] = {}
    for path in sorted(MODULES_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for name, (bases, doc) in _classes(path).items():
            found[name] = (f"lightning_tune.recipes.{path.stem}", bases, doc)

    def is_recipe(name: str, seen: frozenset = frozenset()) -> bool:
        if name not in found or name in seen:
            return False
        return any(base == BASE_RECIPE or is_recipe(base, seen | {name}) for base in found[name][1])

    exported, top_level = _exported(MODULES_DIR / "__init__.py"), _top_level(MODULES_DIR.parent / "__init__.py")
    recipes = []
    for name, (module, _, doc) in found.items():
        if name != BASE_RECIPE and is_recipe(name):
            path = f"lightning_tune.{name}" if name in top_level else f"lightning_tune.recipes.{name}" if name in exported else f"{module}.{name}"
            recipes.append(Recipe(name, path, doc))
    return sorted(recipes, key=lambda r: r.name)


def registered_recipes() -> list[Recipe]:
    """Recipes installed packages register (`lightning_tune.recipes` entry points), not imported."""
    out = []
    for ep in entry_points(group=RECIPE_ENTRY_POINTS):
        path = ep.value.replace(":", ".")
        dist = getattr(ep, "dist", None)
        origin = f"from {dist.metadata['Name']}" if dist is not None else "registered"
        out.append(Recipe(ep.name, path, f"{origin} ({RECIPE_ENTRY_POINTS} entry point)"))
    return sorted(out, key=lambda r: r.name)


def recipes() -> list[Recipe]:
    return bundled_recipes() + registered_recipes()


def config_folders() -> list[tuple[str, Path]]:
    """(label, folder) in the order `--config NAME` searches them."""
    folders = [(f"{CONFIG_PATH_ENV}", p) for p in env_config_dirs()]
    folders += [(f"{CONFIG_ENTRY_POINTS} entry point", p) for p in entry_point_config_dirs()]
    return [*folders, ("bundled", CONFIG_DIR)]
