"""The package's shape, kept so: imports run down the floors (cli, use cases, runtime, io, layout,
models, quant, ground) with no circle, module-level or inside a function; nothing outside
reshard/models/ names a model family or branches on one, every
module imports on its own, and the fact tables (dtypes, rank order, units) agree with what
torch, safetensors and the manifest say."""

from __future__ import annotations

import ast
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from reshard import dtypes, ranks, units
from reshard.models import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "reshard"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    package = root / "reshard"
    return {module_name(p, root): p for p in sorted(package.rglob("*.py"))}


MODULES = package_modules()


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """Nodes under `if TYPE_CHECKING:`: annotations only, never executed, so no import."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imported_names(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names an import statement loads: the module and any submodule it names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if node.level:
        base = package[: len(package) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """reshard module -> the reshard modules it imports, wherever in the file the import sits.
    Importing a.b.c also runs a and a.b, except the packages the importer itself lives in
    (they are already being imported when it runs), unless it names them outright.
    `root`: the folder holding the `reshard` package (a test's planted copy)."""
    modules = package_modules(root)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = type_checking_nodes(tree)
        deps = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in skip:
                continue
            for target in imported_names(module, path, node):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    own_package = module.startswith(name + ".") and name != target
                    if name in modules and name != module and not own_package:
                        deps.add(name)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_names_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_local_and_relative_imports():
    graph = import_graph()
    # reshard/cli/plan.py imports the plan use case inside its command function
    assert "reshard.plan" in graph["reshard.cli.plan"]
    # `from .. import __version__` in io/manifest.py loads the package itself
    assert "reshard" in graph["reshard.io.manifest"]
    assert "reshard.layout.resolve" in graph["reshard.convert"]


# Floors, top to bottom: a module imports only from its own floor or below. A name stands for
# the module and everything under it; the longest name that matches decides.
FLOORS = (
    ("cli", ("reshard.cli", "reshard.__main__")),
    ("use cases", ("reshard.convert", "reshard.plan", "reshard.export", "reshard.inspect",
                   "reshard.verify", "reshard.profile", "reshard.out_name")),
    ("runtime", ("reshard.runtime",)),
    ("io", ("reshard.io",)),
    ("layout", ("reshard.layout",)),
    ("models", ("reshard.models",)),
    ("quant", ("reshard.quant",)),
    ("ground", ("reshard", "reshard.dtypes", "reshard.units", "reshard.ranks", "reshard.errors",
                "reshard.strict_json", "reshard.headers", "reshard.progress")),
)  # fmt: skip


def floor_of(module: str) -> int:
    """The floor's index (0 is the top); -1 for a module no floor names."""
    hits = [
        (len(name), i)
        for i, (_, names) in enumerate(FLOORS)
        for name in names
        if module == name or module.startswith(name + ".")
    ]
    return max(hits)[1] if hits else -1


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower floor to a higher one, as `a (floor) -> b (floor)`."""
    return [
        f"{m} ({FLOORS[floor_of(m)][0]}) -> {d} ({FLOORS[floor_of(d)][0]})"
        for m in sorted(graph)
        for d in sorted(graph[m])
        if floor_of(d) < floor_of(m)
    ]


def test_every_module_stands_on_a_floor():
    top = {m for m in MODULES if m.count(".") == 1}  # a new top-level entry needs a floor
    assert [m for m in sorted(MODULES) if floor_of(m) < 0] == []
    assert sorted(m for m in top if floor_of(m) == len(FLOORS) - 1) == [
        "reshard.dtypes", "reshard.errors", "reshard.headers", "reshard.progress",
        "reshard.ranks", "reshard.strict_json", "reshard.units",
    ]  # fmt: skip


def test_imports_run_down_the_floors():
    upward = upward_imports(import_graph())
    assert not upward, "import from a lower floor to a higher one:\n" + "\n".join(upward)


def test_floor_check_catches_a_planted_upward_import(tmp_path):
    """The checker on the real import graph of a copy of the package with one planted import
    (models/ reaching up into io/), and on a synthetic graph."""
    copy = tmp_path / "reshard"
    copy.mkdir()
    for path in MODULES.values():
        (copy / path.relative_to(PACKAGE)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(PACKAGE)).write_text(path.read_text())
    planted = copy / "models" / "hparams.py"
    planted.write_text(planted.read_text() + "\n\ndef f():\n    from ..io import manifest\n")
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == [
        "reshard.models.hparams (models) -> reshard.io (io)",
        "reshard.models.hparams (models) -> reshard.io.manifest (io)",
    ]
    assert upward_imports({"reshard.quant.x": {"reshard.models"}, "reshard.cli": {"reshard"}}) == [
        "reshard.quant.x (quant) -> reshard.models (models)"
    ]
    assert floor_of("reshard.plan") == 1 and floor_of("reshard.layout.memory.shapes") == 4


MAX_LINES = 400  # STYLE.md: a module past this splits along the data flow


def test_no_module_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


FAMILY_WORDS = {f.name for f in FAMILIES} | {a for f in FAMILIES for a in f.architectures}


def family_mentions(path: Path) -> list[str]:
    """String constants equal to a family name or architecture, and comparisons on `.family`."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in FAMILY_WORDS:
            found.append(f"{where}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "family" for s in sides):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Match) and ast.unparse(node.subject).endswith(".family"):
            found.append(f"{where}:{node.lineno}: match {ast.unparse(node.subject)}")
    return found


def test_no_module_outside_models_names_a_family():
    outside = [p for p in MODULES.values() if "models" not in p.relative_to(PACKAGE).parts]
    found = [hit for path in outside for hit in family_mentions(path)]
    assert not found, "family named outside reshard/models/:\n" + "\n".join(found)


def test_family_scan_catches_a_branch(tmp_path):
    planted = tmp_path / "probe.py"
    planted.write_text(
        "def f(hp):\n"
        "    if hp.family in ('qwen2',):\n"
        "        return 'MixtralForCausalLM'\n"
        "    match hp.family:\n"
        "        case _:\n"
        "            return print(hp.family)\n"  # printing is not branching
    )
    assert sorted(family_mentions(planted)) == [
        "probe.py:2: 'qwen2'",
        "probe.py:2: hp.family in ('qwen2',)",
        "probe.py:3: 'MixtralForCausalLM'",
        "probe.py:4: match hp.family",
    ]


IMPORT_EACH = """
import importlib, sys
failed = []
for name in sys.stdin.read().split():
    for loaded in [m for m in sys.modules if m == "reshard" or m.startswith("reshard.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
"""


def test_every_module_imports_on_its_own():
    """Each module first, with no other reshard module loaded (a partial-init circle shows up
    only in some orders). One interpreter: third-party packages stay loaded between modules,
    reshard's own are dropped before each. `reshard.__main__` runs the CLI when imported."""
    names = [m for m in MODULES if m != "reshard.__main__"]
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH], input="\n".join(names),
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout


def test_cli_help_loads_no_torch():
    code = "import sys, reshard.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "False", done.stderr


# ---- one table per fact, checked against what we did not write ------------------------------


@pytest.mark.parametrize("row", [d for d in dtypes.TABLE if d.name], ids=lambda d: d.code)
def test_dtype_row_matches_torch_and_safetensors(row):
    """Name and size agree with torch; the code is what safetensors' own writer records."""
    dtype = dtypes.torch_dtypes()[row.code]
    assert str(dtype) == f"torch.{row.name}"
    assert dtype.itemsize == row.size
    data = save({"t": torch.zeros(3, dtype=dtype)})
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header["t"]["dtype"] == row.code
    assert header["t"]["data_offsets"] == [0, 3 * row.size]


def test_unsigned_codes_without_a_torch_view_keep_their_sizes():
    # U16/U32/U64: safetensors' spec sizes; reshard copies their bytes and never views them.
    assert {d.code: d.size for d in dtypes.TABLE if d.name is None} == {
        "U64": 8, "U32": 4, "U16": 2,
    }  # fmt: skip
    assert dtypes.dtype_name("U16") == "U16"


def test_dtype_spellings_derive_from_the_table():
    assert dtypes.CAST_DTYPES == {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
    assert dtypes.recipe_spellings()["half"] == "float16"
    assert dtypes.cli_spellings() == [
        "auto", "keep", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32",
    ]  # fmt: skip
    assert dtypes.dtype_name(torch.float8_e4m3fn) == "float8_e4m3fn"
    assert dtypes.dtype_name("BF16") == "bfloat16"


def test_importing_dtypes_loads_no_torch():
    code = "import sys, reshard.dtypes, reshard.headers; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (4, 1, 2), (2, 3, 2), (8, 2, 1)])
def test_rank_order_is_tp_fastest_and_inverts(tp, pp, dp):
    order = [(d, s, t) for d in range(dp) for s in range(pp) for t in range(tp)]  # TP fastest
    for rank, (d, s, t) in enumerate(order):
        assert ranks.global_rank(d, s, t, tp=tp, pp=pp) == rank
        assert ranks.rank_coords(rank, tp=tp, pp=pp) == (d, s, t)
        assert ranks.replica_base(rank, tp=tp, pp=pp) == rank % (tp * pp)


def test_units_format_sizes_the_one_way():
    assert units.format_bytes(12_345_678) == "12.35 MB"
    assert units.format_gb(12_345_678_900) == "12.35 GB"
    assert units.format_gb(1_234_000_000_000) == "1234.00 GB"  # a column stays in GB
    assert units.format_gb(12_345, tiny=True) == "0.01 MB"
    assert units.format_gb(9_999, tiny=True) == "9999 B"
    assert units.format_gb(10**7, tiny=True) == "0.01 GB"
    assert units.SIZE_UNITS["GIB"] == 2**30 and units.SIZE_UNITS["GB"] == 10**9
    assert math.isclose(79.22 * units.GIB / units.GB, 85.06, abs_tol=0.005)  # gpus.py's note
