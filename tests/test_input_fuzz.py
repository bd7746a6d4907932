"""Seeded fuzzing of the inputs issue 25 found weak: recipe TOML (differential against
`tomllib`), costs.json and expert_load.json (against Python's `json`), and rank markers
(against `json`, and against the rank file's real hashes).

Per case, reshard must never crash (only its own errors), never accept a document the
reference reader refuses, and when it accepts, every value it hands on must be in bounds
(finite, not a bool, within the documented limits) and usable by the next step (the stage
costs, the markers' claims). Refusing more than the reference is allowed.

Counts print with: python -m pytest -q -s tests/test_input_fuzz.py -k fuzz
"""

from __future__ import annotations

import json
import math
import random
import time
import tomllib
from collections import Counter
from pathlib import Path

import pytest
from test_golden_bytes import FIXTURES, write_fixture
from test_header_fuzz import FIELD_VALUES, HOSTILE_TOKENS, mutate_bytes

from reshard.convert import convert_model
from reshard.errors import InputError, OutputError, ReshardError
from reshard.io.rank_subset import check_marker_claims, marker_name, read_markers
from reshard.io.writer import Written
from reshard.layout import recipe as recipe_module
from reshard.layout.experts.report import MAX_TOKENS, read_expert_load
from reshard.layout.recipe import MAX_DEGREE, MAX_SIZE, Recipe, build_recipe, load_recipe
from reshard.layout.stages.costs import MAX_MICROS, item_costs_from_profile, model_shape, read_costs
from reshard.models.hparams import parse_hparams

SEED = 20261206
CASES = {"recipe": 1500, "costs": 1500, "expert_load": 1500, "marker": 1000}

# --- recipe TOML ------------------------------------------------------------------------------

RECIPE = """[layout]
tp = {tp}
pp = {pp}
stages = {stages}
[output]
dtype = {dtype}
max_file_size = {size}
keep_mtp = {mtp}
[experts]
placement = {placement}
redundant = {redundant}
load = {load}
gpus_per_node = {gpn}
[costs]
file = {file}
"""
GOOD = {
    "tp": "2", "pp": "2", "stages": "[[0, 1], [2, 2]]", "dtype": '"bf16"', "size": '"20GB"',
    "mtp": "false", "placement": '"balanced"', "redundant": "0", "load": '"load.json"',
    "gpn": "8", "file": '"costs.json"',
}  # fmt: skip
TOML_TOKENS = [
    "1" * 400, "9" * 20, "-1", "0", "65537", "65536", "2_147_483_648", "0x7fffffffffffffff",
    "1e999", "inf", "nan", "-inf", "+1", "true", "1.5", '""', '"x"', "'20GB'", '"1e400GB"',
    '"' + "1" * 400 + 'GB"', '"0.5B"', "[]", "[[0, 1]]", "[[0, 99], [100, 2]]", "[[1, 2, 3]]",
    "[" * 400 + "]" * 400, "{}", "{a = 1}", '"\\ud800"', '"\\uD800"', '"""x"""', "1979-05-27",
    '"auto"', '"fp8"', "[1, [2]]", '"' + "x" * 5000 + '"',
]  # fmt: skip


def make_recipe(rng: random.Random) -> bytes:
    values = dict(GOOD)
    for key in rng.sample(sorted(values), rng.choice((0, 1, 1, 2, 3))):
        values[key] = rng.choice(TOML_TOKENS)
    text = RECIPE.format(**values)
    lines = text.splitlines(keepends=True)
    if rng.random() < 0.3:  # drop lines: sections and keys go missing
        lines = [ln for ln in lines if rng.random() > 0.2]
    raw = "".join(lines).encode()
    return mutate_bytes(rng, raw) if rng.random() < 0.4 else raw


def read_toml_reference(raw: bytes):
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return None


def check_recipe(recipe: Recipe, doc: dict) -> None:
    """What reshard accepted is what the TOML says, in bounds."""
    layout = doc.get("layout", {})
    for key in ("tp", "pp", "ep", "dp"):
        value = getattr(recipe, key)
        assert type(value) is int and 1 <= value <= MAX_DEGREE, (key, value)
        if key in layout:
            assert layout[key] == value, (key, layout[key], value)
    assert type(recipe.redundant) is int and 0 <= recipe.redundant <= MAX_DEGREE
    assert recipe.max_file_size is None or 1 <= recipe.max_file_size <= MAX_SIZE
    for key in ("load", "costs"):
        assert getattr(recipe, key) is None or isinstance(getattr(recipe, key), Path)


def fuzz_recipes(tmp: Path, cases: int, seed: int) -> Counter:
    rng = random.Random(seed)
    tally: Counter = Counter()
    path = tmp / "r.toml"
    for i in range(cases):
        raw = make_recipe(rng)
        path.write_bytes(raw)
        ref = read_toml_reference(raw)
        try:
            ours = load_recipe(path)
        except ReshardError:
            ours = None
        except Exception as e:  # noqa: BLE001 - a crash is the finding
            raise AssertionError(f"case {i}: {type(e).__name__}: {e!s:.200}\n{raw[:400]!r}") from e
        if ref is None:
            assert ours is None, f"case {i}: accepted what tomllib refuses: {raw[:400]!r}"
            tally["tomllib refuses"] += 1
        elif ours is None:
            tally["reshard refuses, tomllib accepts"] += 1
        else:
            check_recipe(ours, ref)
            tally["both accept"] += 1
    return tally


# --- costs.json and expert_load.json ----------------------------------------------------------


def splice_values(rng: random.Random, doc, paths: list[tuple]) -> bytes:
    """Replace the values at some key paths with hostile JSON tokens, as raw text."""
    doc = json.loads(json.dumps(doc))
    marks = {}
    for n, path in enumerate(rng.sample(paths, rng.choice((1, 1, 2)))):
        target = doc
        for key in path[:-1]:
            target = target[key] if isinstance(target, (dict, list)) else None
        if not isinstance(target, (dict, list)):  # an earlier splice replaced a parent
            continue
        marks[f"__HOSTILE_{n}__"] = rng.choice(HOSTILE_TOKENS)
        target[path[-1]] = f"__HOSTILE_{n}__"
    raw = json.dumps(doc).encode()
    for mark, token in marks.items():
        raw = raw.replace(f'"{mark}"'.encode(), token, 1)
    return raw


def set_values(rng: random.Random, doc, paths: list[tuple]) -> bytes:
    doc = json.loads(json.dumps(doc))
    path = rng.choice(paths)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if rng.random() < 0.2:
        target.pop(path[-1], None) if isinstance(target, dict) else None
    else:
        target[path[-1]] = rng.choice(FIELD_VALUES + [1e308, -1e308, 1e15, 2e15, "9" * 5000])
    return json.dumps(doc).encode()


def leaf_paths(doc, prefix=()) -> list[tuple]:
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in leaf_paths(v, (*prefix, k))] + [prefix]
    if isinstance(doc, list):
        return [p for i, v in enumerate(doc) for p in leaf_paths(v, (*prefix, i))] + [prefix]
    return [prefix]


def mutate_json(rng: random.Random, doc) -> bytes:
    paths = [p for p in leaf_paths(doc) if p]
    op = rng.randrange(4)
    if op == 0:
        return splice_values(rng, doc, paths)
    if op == 1:
        return set_values(rng, doc, paths)
    if op == 2:  # a hostile key: 5000 digits, a negative layer, a surrogate
        doc = json.loads(json.dumps(doc))
        where = rng.choice([p for p in [()] + paths if isinstance(_at(doc, p), dict)])
        key = rng.choice(["9" * 5000, "-1", "01", "1.0", " 1", "\ud800", "", "99999999999"])
        _at(doc, where)[key] = _at(doc, where).get("0", [1, 1, 1, 1])
        return json.dumps(doc).encode()
    return mutate_bytes(rng, json.dumps(doc).encode())


def _at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def read_json_reference(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def fuzz_json(tmp: Path, kind: str, base, read, check, cases: int, seed: int) -> Counter:
    rng = random.Random(seed)
    tally: Counter = Counter()
    path = tmp / f"{kind}.json"
    for i in range(cases):
        raw = mutate_json(rng, base)
        path.write_bytes(raw)
        ref = read_json_reference(raw)
        try:
            ours = read(path)
        except ReshardError:
            ours = None
        except Exception as e:  # noqa: BLE001 - a crash is the finding
            raise AssertionError(
                f"{kind} case {i}: {type(e).__name__}: {e!s:.200}\n{raw[:300]!r}"
            ) from e
        if ref is None:
            assert ours is None, f"{kind} case {i}: accepted what json refuses: {raw[:300]!r}"
            tally["json refuses"] += 1
        elif ours is None:
            tally["reshard refuses, json accepts"] += 1
        else:
            check(ours)
            tally["both accept"] += 1
    return tally


HP = parse_hparams(
    {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
     "vocab_size": 101}
)  # fmt: skip
COSTS = {
    "format": "reshard-costs", "version": 1, "model": model_shape(HP), "device": "cpu",
    "batch": 1, "seq": 16, "mode": "prefill",
    "kinds": {k: {"median_us": v, "iqr_us": 0.5} for k, v in
              {"embed": 1.0, "layer:full_attention+dense": 2.5, "head": 3}.items()},
}  # fmt: skip


def check_costs(profile: dict) -> None:
    for entry in profile["kinds"].values():
        for key in ("median_us", "iqr_us"):
            value = entry[key]
            assert not isinstance(value, bool) and isinstance(value, (int, float)), entry
            assert math.isfinite(value) and 0 <= value <= MAX_MICROS, entry
    try:
        items = item_costs_from_profile(HP, profile, where="costs.json")
    except InputError:
        return
    assert all(type(i.cost) is int and i.cost >= 1 for i in items)


LOAD = {
    "format": "reshard-expert-load", "version": 1, "model": "m", "num_experts": 4,
    "prompts": 3, "heldout_prompts": 1,
    "layers": {"0": [5, 1, 0, 2], "1": [1.5, 1, 1, 1]},
    "heldout": {"0": [1, 1, 1, 1], "1": [0, 0, 2, 2]},
}  # fmt: skip


def check_load(load) -> None:
    for layers in (load.layers, load.heldout):
        for layer, counts in layers.items():
            assert type(layer) is int and layer >= 0
            assert len(counts) == load.num_experts
            for x in counts:
                assert not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= MAX_TOKENS


# --- rank markers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A tp 2 output with only rank 0 written: its marker, its file, the plan."""
    root = tmp_path_factory.mktemp("markers")
    src = write_fixture(root / "src", FIXTURES["llama"][0])  # no transformers: fast
    out = root / "half"
    result = convert_model(str(src), out, build_recipe(tp=2), ranks="0")
    marker = json.loads((out / marker_name(0)).read_text())
    return out, result.plan, marker


def fuzz_markers(out: Path, plan, base: dict, cases: int, seed: int) -> Counter:
    rng = random.Random(seed)
    tally: Counter = Counter()
    path = out / marker_name(0)
    truth = {n: dict(e["tensors"]) for n, e in base["files"].items()}
    for i in range(cases):
        raw = mutate_json(rng, base) if rng.random() < 0.9 else json.dumps(base).encode()
        path.write_bytes(raw)
        ref = read_json_reference(raw)
        try:
            found = read_markers(out, plan)
            if found:
                check_marker_claims(out, found, Written({}, {}))
        except OutputError:  # a well-formed marker whose claims the file refutes
            tally["claims refuted"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - a crash is the finding
            raise AssertionError(
                f"marker case {i}: {type(e).__name__}: {e!s:.200}\n{raw[:300]!r}"
            ) from e
        if ref is None:
            assert not found, f"marker case {i}: accepted what json refuses: {raw[:300]!r}"
            tally["json refuses"] += 1
        elif not found:
            tally["reshard ignores, json accepts"] += 1
        else:  # accepted and its claims checked out: they are the truth
            assert {n: e["tensors"] for n, e in found[0]["files"].items()} == truth
            tally["accepted (true claims)"] += 1
    path.write_text(json.dumps(base))
    return tally


# --- the tests --------------------------------------------------------------------------------


def _report(capsys, kind: str, tally: Counter, seconds: float) -> None:
    with capsys.disabled():
        print(f"\n{kind} fuzz: {sum(tally.values())} cases, seed {SEED}, {seconds:.1f} s: "
              f"{dict(tally)}")  # fmt: skip


def test_recipe_toml_fuzz_against_tomllib(tmp_path, capsys):
    start = time.perf_counter()
    tally = fuzz_recipes(tmp_path, CASES["recipe"], SEED)
    _report(capsys, "recipe TOML", tally, time.perf_counter() - start)
    assert sum(tally.values()) == CASES["recipe"]
    assert min(tally["both accept"], tally["tomllib refuses"]) > CASES["recipe"] // 20, tally


def test_costs_json_fuzz_against_json(tmp_path, capsys):
    start = time.perf_counter()
    tally = fuzz_json(tmp_path, "costs", COSTS, read_costs, check_costs, CASES["costs"], SEED)
    _report(capsys, "costs.json", tally, time.perf_counter() - start)
    assert min(tally["both accept"], tally["json refuses"]) > CASES["costs"] // 20, tally


def test_expert_load_json_fuzz_against_json(tmp_path, capsys):
    start = time.perf_counter()
    n = CASES["expert_load"]
    tally = fuzz_json(tmp_path, "expert_load", LOAD, read_expert_load, check_load, n, SEED)
    _report(capsys, "expert_load.json", tally, time.perf_counter() - start)
    assert min(tally["both accept"], tally["json refuses"]) > n // 20, tally


def test_rank_marker_fuzz_against_json_and_the_files(half, capsys):
    out, plan, base = half
    start = time.perf_counter()
    tally = fuzz_markers(out, plan, base, CASES["marker"], SEED)
    _report(capsys, "rank marker", tally, time.perf_counter() - start)
    assert tally["accepted (true claims)"] > CASES["marker"] // 20, tally
    assert tally["claims refuted"] > 0 and tally["json refuses"] > 0, tally


# --- the fuzzers can fail ---------------------------------------------------------------------


def test_the_recipe_fuzzer_catches_a_lenient_reader(tmp_path, monkeypatch):
    """A reader that decodes Latin-1 and reads what it cannot parse as an empty recipe is
    caught as accepting what tomllib refuses: the differential check has teeth."""

    def lenient(path):
        try:
            return tomllib.loads(Path(path).read_bytes().decode("latin-1"))
        except (tomllib.TOMLDecodeError, RecursionError):
            return {}

    monkeypatch.setattr(recipe_module, "read_toml", lenient)
    with pytest.raises(AssertionError, match="accepted what tomllib refuses"):
        fuzz_recipes(tmp_path, CASES["recipe"], SEED)


def test_the_json_fuzzer_catches_an_unbounded_cost(tmp_path, monkeypatch):
    """Without the bound on median_us, 1e308 gets through and the check names it."""
    from reshard.layout.stages import costs

    monkeypatch.setattr(costs, "MAX_MICROS", math.inf)
    with pytest.raises(AssertionError):
        fuzz_json(tmp_path, "costs", COSTS, read_costs, check_costs, CASES["costs"], SEED)


def test_the_marker_fuzzer_catches_unchecked_claims(half, monkeypatch):
    """With the claims check switched off, a marker whose hashes lie is accepted, and the
    fuzzer's comparison with the truth says so."""
    import test_input_fuzz

    out, plan, base = half
    monkeypatch.setattr(test_input_fuzz, "check_marker_claims", lambda *a: None)
    with pytest.raises(AssertionError):
        fuzz_markers(out, plan, base, CASES["marker"], SEED)
