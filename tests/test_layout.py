"""The floors of README's *The code*: every module imports only modules on floors below its own."""

from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGE = REPO / "src" / "attnmt"


def floors() -> tuple[dict[str, int], set[str]]:
    """Each module's floor (0 = top) as README lists them, and the modules any floor may import."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The code"):]
    sentence = re.search(r"checks it\): (.*?); (.*?) \(below all of them\)", section, re.DOTALL)
    assert sentence, "README's The code section lost its list of floors"
    floor_of = {name: i for i, floor in enumerate(sentence.group(1).split("→"))
                for name in re.findall(r"`(\w+)`", floor)}
    return floor_of, set(re.findall(r"`(\w+)`", sentence.group(2)))


def imports() -> dict[str, set[str]]:
    """The attnmt modules (top-level names under the package) each module imports when it is imported:
    module-level statements only, not those inside functions or under ``if TYPE_CHECKING``."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        module = parts[0]
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "attnmt":
                names = node.module.split(".")[1:2] or [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("attnmt.")]
            found.setdefault(module, set()).update(name for name in names if name != module)
    return found


def test_every_module_is_on_a_floor_of_readme() -> None:
    floor_of, below_all = floors()
    modules = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.iterdir()
               if path.suffix == ".py" or (path / "__init__.py").exists()} - {"__init__"}
    assert modules == set(floor_of) | below_all


def test_imports_go_down_the_floors() -> None:
    floor_of, below_all = floors()
    package_names = {"__version__", "install_hint"}  # attnmt/__init__.py's, below everything
    upward = [f"{module} imports {name}" for module, names in imports().items() for name in names - package_names
              if module in below_all or (name not in below_all and floor_of[name] <= floor_of[module])]
    assert not upward, "; ".join(sorted(upward))
