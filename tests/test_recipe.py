"""Recipes: every shipped recipe parses and fits the model it is written for; every mistake in
a recipe is an error naming the file, the key and the fix (a flag that silently does nothing
is the worst kind); CLI flags win over the recipe; relative paths resolve against the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoints import write_checkpoint
from click.testing import CliRunner

from reshard.cli import main
from reshard.errors import InputError
from reshard.layout.check import check_layout
from reshard.layout.recipe import Recipe, build_recipe, load_recipe, parse_size
from reshard.models.hparams import parse_hparams

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# The public config.json of the model each shipped recipe is for (the fields that matter).
LLAMA3_70B = dict(
    architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
)  # fmt: skip
LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
)  # fmt: skip
MIXTRAL_8X7B = dict(
    architectures=["MixtralForCausalLM"], hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
    num_local_experts=8, num_experts_per_tok=2,
)  # fmt: skip
TARGETS = {
    "llama3-70b-8xh100.toml": (LLAMA3_70B, 8),
    "llama3-70b-2x4xh100.toml": (LLAMA3_70B, 8),
    "mixtral-8x7b-4xh100-ep.toml": (MIXTRAL_8X7B, 4),
    "llama3-8b-8xh100-dp.toml": (LLAMA3_8B, 8),
}  # recipe -> (model config, GPUs it is written for)


def write_recipe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def recipe_error(tmp_path: Path, text: str, *needles: str) -> str:
    path = write_recipe(tmp_path / "r.toml", text)
    with pytest.raises(InputError) as e:
        load_recipe(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --- the shipped recipes -------------------------------------------------------------------


def test_recipes_are_shipped():
    assert len(list(RECIPES.glob("*.toml"))) >= 3


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipe_parses_and_says_what_it_is_for(path):
    recipe = load_recipe(path)
    assert recipe.origin == str(path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 20, "open with what the recipe is for"
    assert recipe.load is None or not recipe.load.is_absolute() or recipe.load.exists()
    if path.name in TARGETS:
        config, gpus = TARGETS[path.name]
        check_layout(parse_hparams(config), recipe)  # divisibility, pp <= layers, ep on MoE
        assert recipe.world_size == gpus
        if recipe.ep > 1:
            assert config["num_local_experts"] % recipe.ep == 0


def test_shipped_recipes_cover_tp_pp_ep_dp():
    recipes = [load_recipe(p) for p in RECIPES.glob("*.toml")]
    assert any(r.tp > 1 and r.pp == 1 for r in recipes)
    assert any(r.pp > 1 for r in recipes)
    assert any(r.ep > 1 for r in recipes)
    assert any(r.dp > 1 for r in recipes)


# --- a recipe's own mistakes ---------------------------------------------------------------


def test_unknown_section(tmp_path):
    recipe_error(
        tmp_path, "[layuot]\ntp = 4\n", "unknown section [layuot]", "layout, output, experts"
    )


def test_unknown_key(tmp_path):
    recipe_error(
        tmp_path,
        "[layout]\ntensor_parallel = 4\n",
        "unknown key 'tensor_parallel' in [layout]",
        "known: tp, pp, ep, dp, stages",
    )


def test_key_in_the_wrong_section(tmp_path):
    recipe_error(tmp_path, "[output]\ntp = 4\n", "unknown key 'tp' in [output]")


def test_key_outside_any_section(tmp_path):
    recipe_error(tmp_path, "tp = 4\n", "'tp' is not in a section", "[layout]")


def test_not_toml(tmp_path):
    recipe_error(tmp_path, "[layout\ntp = 4\n", "not valid TOML")


def test_missing_recipe(tmp_path):
    with pytest.raises(InputError, match="recipe not found. See recipes/"):
        load_recipe(tmp_path / "nope.toml")


@pytest.mark.parametrize("dtype", ["int8", "fp8", "bfloat", "auto"])
def test_bad_dtype(tmp_path, dtype):
    recipe_error(tmp_path, f'[output]\ndtype = "{dtype}"\n', f"dtype {dtype!r} is not one of")


@pytest.mark.parametrize(
    "text, dtype",
    [('"bf16"', "bfloat16"), ('"FP16"', "float16"), ('"half"', "float16"), ('"keep"', "keep")],
)
def test_dtype_aliases(tmp_path, text, dtype):
    assert load_recipe(write_recipe(tmp_path / "r.toml", f"[output]\ndtype = {text}\n")).dtype == (
        dtype
    )


@pytest.mark.parametrize(
    "value", ['"20 GBs"', '"big"', '"-5GB"', "0", "-5", '"0GB"', '"0.5B"', "true", '""', "[1]"]
)
def test_bad_max_file_size(tmp_path, value):
    recipe_error(
        tmp_path, f"[output]\nmax_file_size = {value}\n", "max_file_size", "is not a size", "20GB"
    )


@pytest.mark.parametrize(
    "value, size",
    [
        ("20GB", 20 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5 GiB", 3 * 2**29),
        ("100kb", 100_000),
        (1_000_000, 1_000_000),
        ("7", 7),
    ],
)
def test_sizes(value, size):
    assert parse_size(value, where="test") == size


def test_stages_count_must_match_pp(tmp_path):
    recipe_error(
        tmp_path,
        "[layout]\npp = 2\nstages = [[0, 31]]\n",
        "stages lists 1 stages but pp=2",
        "one [first, last] layer range per stage",
    )


@pytest.mark.parametrize(
    "stages", ["[0, 31]", "[[0, 9, 10], [11, 31]]", '"0-9,10-31"', "[[0, 9.5], [10, 31]]"]
)
def test_stages_must_be_pairs(tmp_path, stages):
    recipe_error(
        tmp_path,
        f"[layout]\npp = 2\nstages = {stages}\n",
        "stages must be a list of [first, last] layer pairs",
        "stages = [[0, 9], [10, 31]]",
    )


def test_stages_parse(tmp_path):
    path = write_recipe(tmp_path / "r.toml", "[layout]\npp = 2\nstages = [[0, 9], [10, 31]]\n")
    assert load_recipe(path).stages == ((0, 9), (10, 31))


@pytest.mark.parametrize("value", ["0", "-1", "true", '"4"', "2.0"])
def test_degrees_are_positive_integers(tmp_path, value):
    recipe_error(tmp_path, f"[layout]\ntp = {value}\n", "tp must be a positive integer")


def test_ep_must_divide_tp(tmp_path):
    recipe_error(tmp_path, "[layout]\ntp = 4\nep = 3\n", "ep=3 must divide tp=4", "[1, 2, 4]")


def test_bad_placement_and_redundant(tmp_path):
    recipe_error(tmp_path, '[experts]\nplacement = "greedy"\n', "placement 'greedy'", "balanced")
    recipe_error(tmp_path, "[experts]\nredundant = -1\n", "redundant must be >= 0")


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    folder = tmp_path / "deploy" / "recipes"
    path = write_recipe(
        folder / "r.toml",
        '[experts]\nload = "data/expert_load.json"\n[costs]\nfile = "../costs.json"\n',
    )
    recipe = load_recipe(path)
    assert recipe.load == folder / "data" / "expert_load.json"
    assert recipe.costs == folder / ".." / "costs.json"
    # and they stay resolved when flags are merged on top
    merged = build_recipe(path, tp=2)
    assert merged.load == recipe.load and merged.costs == recipe.costs


def test_absolute_paths_are_kept(tmp_path):
    target = tmp_path / "elsewhere" / "costs.json"
    path = write_recipe(tmp_path / "r" / "r.toml", f'[costs]\nfile = "{target}"\n')
    assert load_recipe(path).costs == target


# --- flags on top of a recipe --------------------------------------------------------------


def test_flags_override_the_recipe(tmp_path):
    path = write_recipe(
        tmp_path / "r.toml",
        '[layout]\ntp = 4\npp = 2\nstages = [[0, 1], [2, 2]]\n[output]\ndtype = "bf16"\n',
    )
    assert build_recipe(path) == load_recipe(path)
    recipe = build_recipe(path, tp=2, dtype="float32")
    assert (recipe.tp, recipe.pp, recipe.dtype) == (2, 2, "float32")
    assert recipe.stages == ((0, 1), (2, 2))  # pp unchanged: the explicit stages still hold
    assert recipe.origin == f"{path} + flags"
    assert build_recipe(path, pp=3).stages is None  # --pp replaces the recipe's stages


def test_flags_are_validated_like_the_recipe(tmp_path):
    path = write_recipe(tmp_path / "r.toml", "[layout]\ntp = 4\nep = 4\n")
    with pytest.raises(InputError, match="ep=4 must divide tp=2"):
        build_recipe(path, tp=2)


def test_no_recipe_no_flags_is_the_default():
    assert build_recipe() == Recipe()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("recipe") / "llama")


def convert(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["convert", *map(str, args), "--quiet"])
    return result.exit_code, result.output


def test_cli_recipe_then_flag(model_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", "[layout]\ntp = 4\n")
    code, output = convert(model_dir, "-o", tmp_path / "a", "--recipe", recipe)
    assert code == 0, output
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["layout"]["tp"] == 4
    code, output = convert(model_dir, "-o", tmp_path / "b", "--recipe", recipe, "--tp", 2)
    assert code == 0, output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["layout"]["tp"] == 2 and len(manifest["ranks"]) == 2


def test_cli_bad_recipe_exits_2_without_output(model_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", "[layout]\ntensor_parallel = 4\n")
    code, output = convert(model_dir, "-o", tmp_path / "out", "--recipe", recipe)
    assert code == 2 and f"{recipe}: unknown key 'tensor_parallel'" in output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--recipe", "missing.toml"], "recipe not found"),
        (["--dtype", "int4"], "Invalid value for '--dtype': 'int4' is not one of 'auto', 'keep'"),
        (["--max-file-size", "lots"], "error: --max-file-size 'lots' is not a size"),
        (["--placement", "random"], "Invalid value for '--placement': 'random' is not one of"),
        (["--tp", "0"], "error: --tp must be a positive integer, got 0.\n"),
        (["--tp", "2", "--ep", "3"], "error: --ep/--tp: ep=3 must divide tp=2"),
    ],
)
def test_cli_bad_flags_exit_2_naming_the_flag(model_dir, tmp_path, args, needle):
    code, output = convert(model_dir, "-o", tmp_path / "out", *args)
    assert code == 2 and needle in output, output
    assert "flags:" not in output and "experts.placement" not in output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_recipe_values_are_named_by_their_key_and_flags_by_their_flag(tmp_path):
    path = write_recipe(tmp_path / "r.toml", '[experts]\nplacement = "greedy"\n')
    with pytest.raises(InputError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: experts.placement 'greedy' is not one of")
    ok = write_recipe(tmp_path / "ok.toml", "[layout]\ntp = 4\n")
    with pytest.raises(InputError) as e:
        build_recipe(ok, ep=3)
    assert str(e.value).startswith("--ep: ep=3 must divide tp=4")
    with pytest.raises(InputError, match=r"^--max-file-size '0.5B' is not a size"):
        build_recipe(max_file_size="0.5B")


def test_dtype_auto_means_keep(model_dir, tmp_path):
    code, output = convert(model_dir, "-o", tmp_path / "out", "--dtype", "auto")
    assert code == 0, output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["layout"]["dtype"] == "keep"
