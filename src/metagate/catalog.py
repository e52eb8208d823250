"""What metagate offers, read without importing torch: ready configs, registered methods and benchmarks.

``metagate list`` and ``metagate --help`` must start in well under a second, and importing torch
takes seconds. Methods and benchmarks register themselves with a decorator
(``@METHODS.register("name")``); this module finds those decorators in the package's source files
with :mod:`ast`, so the registry stays the one source of truth (a test checks both agree). Plugins (other
packages' methods and benchmarks, registered through the entry point groups ``metagate.methods`` and
``metagate.benchmarks``) are read the same way: their module's source is found without importing it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
CONFIG_DIR = PACKAGE_DIR / "configs"
DEFAULT_CONFIG = "default"

# registry variable -> the package folder whose modules register into it, and the entry point group of plugins
_REGISTRIES = {"METHODS": "methods", "BENCHMARKS": "data"}
_PLUGIN_GROUPS = {"METHODS": "metagate.methods", "BENCHMARKS": "metagate.benchmarks"}


def list_ready_configs() -> dict[str, str]:
    """Ready configs shipped in ``configs/``: name -> its one-line description (first comment)."""
    out: dict[str, str] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        out[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return out


def first_sentence(doc: str | None, limit: int = 160) -> str:
    """A docstring's first sentence as plain text (RST roles and literals unwrapped), cut at ``limit``."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)  # :class:`X` -> X
    text = re.sub(r"``([^`]+)``", r"\1", text)  # ``x`` -> x
    text = re.sub(r"`([^`]+)`_?", r"\1", text)
    text = text.replace("**", "").replace("\\", "")
    # a sentence ends at . ! ? before a capital letter or the end, not after an abbreviation (eq., e.g., al.)
    match = re.match(r"(.+?(?<!\beq)(?<!\be\.g)(?<!\bi\.e)(?<!\bal)(?<!\bcf)[.!?])(\s+(?=[A-Z(])|$)", text)
    sentence = match.group(1) if match else text
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rsplit(" ", 1)[0] + " …"


def _registrations(tree: ast.Module, registry: str) -> dict[str, str]:
    """Name -> first docstring sentence of every class in ``tree`` decorated ``@<registry>.register("name")``."""
    here: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            if (
                isinstance(deco, ast.Call)
                and isinstance(deco.func, ast.Attribute)
                and deco.func.attr == "register"
                and isinstance(deco.func.value, ast.Name)
                and deco.func.value.id == registry
                and deco.args
                and isinstance(deco.args[0], ast.Constant)
            ):
                here[str(deco.args[0].value)] = first_sentence(ast.get_docstring(node))
    if len(here) == 1 and ast.get_docstring(tree):
        here = {name: first_sentence(ast.get_docstring(tree)) for name in here}
    return here


def _plugin(ep: importlib.metadata.EntryPoint) -> str:
    """An entry point's description, read from its module's source without importing the module: the named
    class's docstring, else the module's; ``(plugin, from <module>)`` is added, or said alone."""
    module, _, attr = ep.value.partition(":")
    where = f"(plugin, from {module.strip()})"
    try:
        spec = importlib.util.find_spec(module.strip())
        tree = ast.parse(Path(spec.origin).read_text()) if spec and spec.origin and spec.origin.endswith(".py") else None
    except (ImportError, ValueError, OSError, SyntaxError):
        tree = None
    if tree is None:
        return where
    doc = next((ast.get_docstring(n) for n in tree.body if isinstance(n, ast.ClassDef) and n.name == attr.strip()), None)
    text = first_sentence(doc or ast.get_docstring(tree))
    return f"{text} {where}" if text else where


def registered(registry: str) -> dict[str, str]:
    """``registry`` (``METHODS`` or ``BENCHMARKS``): name -> the first docstring sentence of the module
    that registers it when the module registers one entry (a method's file names its paper there),
    else of the entry's class; then the installed plugins of its entry point group (a name this package
    registers is not replaced)."""
    found: dict[str, str] = {}
    for path in sorted((PACKAGE_DIR / _REGISTRIES[registry]).rglob("*.py")):  # a method grown into a package too
        found.update(_registrations(ast.parse(path.read_text(), str(path)), registry))
    for ep in importlib.metadata.entry_points(group=_PLUGIN_GROUPS[registry]):
        if ep.name not in found:
            found[ep.name] = _plugin(ep)
    return dict(sorted(found.items()))
