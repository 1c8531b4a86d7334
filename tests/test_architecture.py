"""The import rules of docs/architecture.md, read from every module's imports (ast), so a change that breaks them fails.

The layers, lowest first: adapter (the library) < pipeline (SDXL around it) < trainer < verbs < ui (the web app, a
client of the command). A module imports its own layer and the ones below, never one above, except the `ui` verb,
which imports the UI's server inside its function (the UI's dependencies are an optional extra). world/ (the mini world) stands beside them: it may use the adapter
library, the pipelines and the trainer, and of the layers only the trainer uses it, through world.analyzer alone.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dreambooth_moslora"
LAYERS = ("adapter", "pipeline", "trainer", "verbs", "ui")
WORLD = "world"
TRAINER_MAY_IMPORT_FROM_WORLD = {"dreambooth_moslora.world.analyzer"}  # the mini world's feature model
VERBS_MAY_IMPORT_FROM_UI = {"dreambooth_moslora.ui.server"}  # `dreambooth-moslora ui`, inside its function
ROOT_MODULES = {"__init__", "single_file"}  # the public API, and the path that model cards name


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every dreambooth_moslora module that `path` imports, at the top or inside a function."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            # `from . import x` and `from pkg import module` name modules too
            found |= {f"{base}.{alias.name}" for alias in node.names
                      if (ROOT / Path(*f"{base}.{alias.name}".split("."))).with_suffix(".py").is_file()
                      or (ROOT / Path(*f"{base}.{alias.name}".split("."))).is_dir()}
    return {m for m in found if m == "dreambooth_moslora" or m.startswith("dreambooth_moslora.")}


def part_of(module: str) -> str:
    """The layer, 'world', or 'root' (the package's own __init__ and the modules beside it)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in (*LAYERS, WORLD) else "root"


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_lives_in_a_layer_or_the_world():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in ROOT_MODULES]
    assert not loose, f"modules beside __init__.py: {loose}; put each in a layer (docs/architecture.md)"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == {*LAYERS, WORLD}, "a new subpackage: add it to the layers here and in docs/architecture.md"


def test_no_layer_imports_one_above_it():
    broken = []
    for path in modules():
        here = part_of(module_name(path))
        if here not in LAYERS:
            continue
        for target in imported_modules(path):
            there = part_of(target)
            if there == "root":
                broken.append(f"{module_name(path)} imports {target}: the public API imports the layers, not back")
            elif here == "verbs" and target in VERBS_MAY_IMPORT_FROM_UI:
                continue
            elif there in LAYERS and LAYERS.index(there) > LAYERS.index(here):
                broken.append(f"{module_name(path)} ({here}) imports {target} ({there}), a layer above it")
            elif there == WORLD and not (here == "trainer" and target in TRAINER_MAY_IMPORT_FROM_WORLD):
                broken.append(f"{module_name(path)} ({here}) imports {target}: of the world, only the trainer "
                              f"uses {sorted(TRAINER_MAY_IMPORT_FROM_WORLD)}")
    assert not broken, "\n".join(broken)


def test_the_world_never_imports_the_verbs_or_the_public_api():
    broken = [f"{module_name(path)} imports {target}" for path in modules() if part_of(module_name(path)) == WORLD
              for target in imported_modules(path) if part_of(target) in ("verbs", "root")]
    assert not broken, "\n".join(broken)


def test_the_rules_see_the_imports_they_check():
    """A guard on the checker itself: it must find the known edges, relative and lazy ones included."""
    imports = imported_modules(PACKAGE / "verbs" / "cli.py")
    assert {"dreambooth_moslora.trainer.train", "dreambooth_moslora.pipeline.tiny",
            "dreambooth_moslora.adapter.errors"} <= imports  # two of them imported inside functions
    assert "dreambooth_moslora.world.analyzer" in imported_modules(PACKAGE / "trainer" / "validation_metrics.py")
    assert "dreambooth_moslora.ui.server" in imported_modules(PACKAGE / "verbs" / "cli.py")
    assert part_of("dreambooth_moslora.verbs.cli") == "verbs" and part_of("dreambooth_moslora") == "root"


def test_the_adapter_library_imports_without_the_trainers_dependencies():
    names = sorted(p.stem for p in (PACKAGE / "adapter").glob("*.py") if p.stem != "__init__")
    script = ("import sys, importlib\nimport dreambooth_moslora\n"
              f"for name in {names!r}:\n    importlib.import_module('dreambooth_moslora.adapter.' + name)\n"
              "from dreambooth_moslora import MoSLoRAConfig, inject_moslora, load_adapter, load_moslora, export_kohya\n"
              "print(sorted(m for m in ('accelerate', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_every_subpackage_is_installed():
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools]")[1]
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"packages = \[(.*?)\]", section, re.S).group(1)))
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages == listed, "pyproject.toml's [tool.setuptools] packages must list every subpackage"
