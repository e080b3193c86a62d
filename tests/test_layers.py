"""The layers of cmcore (README, Architecture): every module sits on a floor and imports only
modules on its own floor or below, and no two subpackages (or top-level modules) import each
other, directly or round a loop. Parsed with ast, so imports inside functions count too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cmcore"

# The floor of each top-level unit of cmcore (a subpackage or a module); "" is cmcore/__init__.
FLOORS = {
    "": 0, "config": 0, "config_rules": 0,        # config: loading, validation, its rules
    "dag": 0, "threads": 0, "files": 0,           # the DAG's torch-free helpers, threads, writes
    "errors": 0,                                  # the errors a step reports in one line
    "diffusion": 1,                               # the paper's maths
    "networks": 2, "data": 2, "prepared": 2,      # backbones; data sets; the prepared file
    "methods": 3,                                 # what is trained
    "models": 4, "training": 4,                   # models from configs/checkpoints; the loop
    "sampling": 5, "evaluation": 5,               # how a model is used and scored
    "experiments": 6, "convert": 6, "export": 6,  # studies; foreign checkpoints; exports
    "diffusers_export": 6,                        # the export's diffusers folder
    "cli": 7, "__main__": 7,                      # the one place the config becomes arguments
}


def module_name(path):
    """cmcore/sampling/samplers.py -> cmcore.sampling.samplers; cmcore/networks/__init__.py ->
    cmcore.networks."""
    parts = ["cmcore", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(name):
    """The top-level unit of a module: cmcore.sampling.samplers -> "sampling", cmcore -> ""."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported(name, is_package, source):
    """The cmcore modules that ``source`` (module ``name``) imports, anywhere in the file."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "cmcore"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: relative to this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "cmcore":
                continue
            # from cmcore import convert: the submodule convert; from cmcore import __version__:
            # cmcore itself.
            found += [f"{base}.{a.name}" if base == "cmcore" and a.name in FLOORS else base
                      for a in node.names]
    return found


def edges(modules):
    """(importer, imported) module names for ``modules``: {name: (is_package, source)}."""
    return [(name, target) for name, (is_package, source) in modules.items()
            for target in imported(name, is_package, source)]


def upward(pairs):
    """The imports in ``pairs`` of a module on a higher floor than the importer's."""
    return [f"{a} (floor {FLOORS[unit(a)]}) imports {b} (floor {FLOORS[unit(b)]})"
            for a, b in pairs if FLOORS[unit(b)] > FLOORS[unit(a)]]


def cycles(pairs):
    """Loops of imports between different units, each as a list of units (empty: none)."""
    graph = {}
    for a, b in pairs:
        if unit(a) != unit(b):
            graph.setdefault(unit(a), set()).add(unit(b))
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(u, path):
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                found.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [u])
    return found


def cmcore_modules():
    return {module_name(p): (p.name == "__init__.py", p.read_text())
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_floor():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30 and PACKAGE / "training" / "loop.py" in files
    missing = [str(p.relative_to(PACKAGE)) for p in files if unit(module_name(p)) not in FLOORS]
    assert not missing, f"add these to FLOORS in tests/test_layers.py: {missing}"


def test_no_module_imports_a_higher_floor():
    pairs = edges(cmcore_modules())
    assert ("cmcore.training.loop", "cmcore.models") in pairs  # the parser sees real imports
    assert ("cmcore.networks.mlp", "cmcore.networks.layers") in pairs  # relative ones too
    bad = upward(pairs)
    assert not bad, "imports go down only:\n" + "\n".join(bad)


def test_no_import_cycle_between_units():
    loops = cycles(edges(cmcore_modules()))
    assert not loops, "import cycles: " + "; ".join(" -> ".join(c) for c in loops)


def test_the_checks_catch_what_they_are_for():
    """An upward import (in a function body, too) and a loop, in made-up modules."""
    modules = {
        "cmcore.diffusion.schedules": (False, "def f():\n    from cmcore.training import loop\n"),
        "cmcore.sampling.samplers": (False, "import cmcore.evaluation.metrics\n"),
        "cmcore.evaluation.metrics": (False, "from ..sampling import samplers\n"),
        "cmcore.cli": (False, "from cmcore import convert, __version__\n"),
    }
    pairs = edges(modules)
    assert ("cmcore.evaluation.metrics", "cmcore.sampling") in pairs
    assert {("cmcore.cli", "cmcore.convert"), ("cmcore.cli", "cmcore")} <= set(pairs)
    assert upward(pairs) == [
        "cmcore.diffusion.schedules (floor 1) imports cmcore.training (floor 4)"]
    assert cycles(pairs) == [["evaluation", "sampling", "evaluation"]]
