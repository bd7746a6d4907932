"""Issue 25, classes 6-9: every file and flag reshard reads is read strictly. A recipe TOML, a
costs.json, an expert_load.json, config.json's rope_type and dtype, a quantization_config,
integer flags, torchrun's environment: a bad value is exit 2 with one `error:` line naming
the file (or flag) and the key and saying the fix; never a traceback, never a silent run.
Each refusal leaves the source byte-identical and writes no output folder.

Also here: the side files in `verify --level hashes`, Ctrl-C during the commit, and writing
to a closed stdout or a full device.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import config_for, write_checkpoint
from hostile import cli, digest_tree, expect_error
from quant_fixtures import SCHEMES, write_quantized
from safetensors.torch import load_file, save_file

from reshard.convert import convert_model
from reshard.layout.recipe import build_recipe
from reshard.layout.stages.costs import model_shape
from reshard.models.hparams import parse_hparams

DIGITS_400 = "1" * 400


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    src = write_checkpoint(root / "src")
    out = root / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    return src, out


@pytest.fixture
def src(built, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(built[0], copy)
    return copy


@pytest.fixture
def out(built, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(built[1], copy)
    return copy


def refused(src: Path, tmp_path: Path, args, *needles) -> str:
    """`convert SRC ARGS -o NEW`: exit 2 naming the needles; SRC unchanged, NEW not made."""
    before = digest_tree(src)
    new = tmp_path / "new"
    message = expect_error(cli("convert", src, *args, "-o", new, "--quiet"), 2, *needles)
    assert digest_tree(src) == before and not new.exists()
    return message


# --- recipe TOML -----------------------------------------------------------------------------

RECIPES = {
    # name: (recipe bytes, what the message names)
    "not UTF-8": (b"[layout]\ntp = 2\n# caf\xe9\n", ["not UTF-8 (byte 0xe9 at offset 21)"]),
    "load = 5": (b"[experts]\nload = 5\n", ["experts.load is 5, not a file path"]),
    "costs.file = true": (b"[costs]\nfile = true\n", ["costs.file is True, not a file path"]),
    "deep stages": (
        b"[layout]\npp = 2\nstages = " + b"[" * 3000 + b"]" * 3000 + b"\n",
        ["nests arrays or tables too deeply", "stages = [[0, 9], [10, 31]]"],
    ),
    "400-digit size": (
        f"[output]\nmax_file_size = {DIGITS_400}\n".encode(),
        ["output.max_file_size", "is not a size from 1 byte to 1 EiB"],
    ),
    "400-digit size text": (
        f'[output]\nmax_file_size = "{DIGITS_400}GB"\n'.encode(),
        ["output.max_file_size", "is not a size from 1 byte to 1 EiB"],
    ),
    "400-digit tp": (
        f"[layout]\ntp = {DIGITS_400}\n".encode(),
        ["layout.tp is an integer of 400 digits; at most 65536"],
    ),
    "400-digit stage": (
        f"[layout]\npp = 2\nstages = [[0, 1], [2, {DIGITS_400}]]\n".encode(),
        ["stages must be a list of [first, last] layer pairs"],
    ),
    "400-digit redundant": (
        f"[experts]\nredundant = {DIGITS_400}\n".encode(),
        ["experts.redundant is an integer of 400 digits"],
    ),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_a_hostile_recipe_is_refused_naming_the_key(src, tmp_path, case):
    body, needles = RECIPES[case]
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(body)
    refused(src, tmp_path, ["--recipe", recipe], str(recipe), *needles)


# --- integer flags ---------------------------------------------------------------------------

FLAGS = {
    "--max-file-size 400 digits": (
        ["--tp", "2", "--max-file-size", DIGITS_400],
        "--max-file-size '" + "1" * 36 + "... is not a size from 1 byte",
    ),
    "--tp 400 digits": (["--tp", DIGITS_400], "--tp is an integer of 400 digits; at most 65536"),
    "--ranks 5000 digits": (
        ["--tp", "2", "--ranks", "9" * 5000],
        "is not a rank or a range like 0-3",
    ),
}


@pytest.mark.parametrize("case", sorted(FLAGS))
def test_a_huge_integer_flag_is_refused(src, tmp_path, case):
    args, needle = FLAGS[case]
    message = refused(src, tmp_path, args, needle)
    assert len(message) < 600  # the number is not echoed whole


def test_export_max_shard_size_of_400_digits(out, tmp_path):
    before = digest_tree(out)
    expect_error(
        cli("export", out, "-o", tmp_path / "hf", "--max-shard-size", DIGITS_400),
        2,
        "--max-shard-size '" + "1" * 36 + "... is not a size from 1 byte",
        "write e.g. 20GB",
    )
    assert digest_tree(out) == before and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tokens", ["100000", "9" * 30, "256"])
def test_max_new_tokens_past_the_models_positions(out, tokens):
    """max_position_embeddings is 256: refused before a model is loaded or a rank spawned."""
    before = digest_tree(out)
    shown = tokens if len(tokens) < 20 else "(a number of 30 digits)"
    expect_error(
        cli("verify", out, "--level", "generate", "--max-new-tokens", tokens),
        2,
        f"--max-new-tokens {shown}: {out}/manifest.json holds 256 positions",
        "give at most 255",
    )
    assert digest_tree(out) == before


# --- torchrun's environment ------------------------------------------------------------------


@pytest.mark.parametrize(
    "missing", [("MASTER_ADDR",), ("MASTER_PORT",), ("MASTER_ADDR", "MASTER_PORT")]
)
def test_a_torchrun_world_without_a_rendezvous_is_refused_before_any_write(
    src, tmp_path, monkeypatch, missing
):
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in missing:
        monkeypatch.delenv(key)
    refused(
        src, tmp_path, ["--tp", "2"],
        f"WORLD_SIZE=2 RANK=0 without {' and '.join(missing)}",
        "Run under torchrun (it sets all four), or unset WORLD_SIZE and RANK",
    )  # fmt: skip


def test_a_5000_digit_world_size_is_refused(src, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "9" * 5000)
    monkeypatch.setenv("RANK", "0")
    refused(src, tmp_path, ["--tp", "2"], "not integers. Run under torchrun, or unset them")


# --- costs.json and expert_load.json ---------------------------------------------------------


def _costs(src: Path, tmp_path: Path, median) -> Path:
    hp = parse_hparams(json.loads((src / "config.json").read_text()))
    kinds = {"embed": 1.0, "layer:full_attention+dense": 2.0, "head": 3.0}
    doc = {
        "format": "reshard-costs", "version": 1, "model": model_shape(hp), "device": "cpu",
        "batch": 1, "seq": 16, "mode": "prefill",
        "kinds": {k: {"median_us": us, "iqr_us": 0.5} for k, us in kinds.items()},
    }  # fmt: skip
    doc["kinds"]["embed"]["median_us"] = median
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("median", [1e308, True, -1.0, "5", None])
def test_a_hostile_cost_is_refused_naming_the_kind(src, tmp_path, median):
    path = _costs(src, tmp_path, median)
    refused(
        src, tmp_path, ["--pp", "2", "--costs", path],
        f"{path}: kind 'embed' needs numbers median_us >= 0",
        "key 'kinds.embed.median_us' is", "reshard profile layers MODEL -o",
    )  # fmt: skip


def test_a_sane_cost_file_is_accepted(src, tmp_path):
    """The control: the same file with a plain number converts."""
    path = _costs(src, tmp_path, 4.0)
    assert cli("plan", src, "--pp", "2", "--costs", path).exit_code == 0


@pytest.fixture
def moe_config(tmp_path) -> Path:
    config = config_for("MixtralForCausalLM").to_dict()
    path = tmp_path / "mixtral" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    return path


def _load(tmp_path: Path, layers: dict) -> Path:
    doc = {"format": "reshard-expert-load", "version": 1, "num_experts": 4, "layers": layers}
    path = tmp_path / "expert_load.json"
    path.write_text(json.dumps(doc))
    return path


LOADS = {
    "5000-digit layer key": ({"9" * 5000: [1, 1, 1, 1]}, "layers has key '99999"),
    "count 1e308": (
        {"0": [1e308, 1, 1, 1], "1": [1, 1, 1, 1], "2": [1, 1, 1, 1]},
        "layers layer 0 expert 0 is 1e+308 tokens",
    ),
    "count true": (
        {"0": [True, 1, 1, 1], "1": [1, 1, 1, 1], "2": [1, 1, 1, 1]},
        "layers layer 0 expert 0 is True, not a number",
    ),
}


@pytest.mark.parametrize("case", sorted(LOADS))
def test_a_hostile_expert_load_is_refused(moe_config, tmp_path, case):
    layers, needle = LOADS[case]
    path = _load(tmp_path, layers)
    before = digest_tree(moe_config.parent)
    message = expect_error(
        cli("plan", moe_config, "--tp", "2", "--ep", "2", "--expert-load", path),
        2, f"{path}: ", needle,
    )  # fmt: skip
    assert len(message) < 600
    assert digest_tree(moe_config.parent) == before


# --- config.json: rope_type, dtype, quantization_config --------------------------------------


def _edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, needle",
    [
        (
            {"rope_parameters": {"rope_type": "lienar", "factor": 2.0}},
            "'rope_parameters.rope_type' is 'lienar'",
        ),
        (
            {"rope_parameters": None, "rope_scaling": {"type": "bogus"}},
            "'rope_scaling.type' is 'bogus'",
        ),
        ({"rope_parameters": {"rope_type": "x" * 100}}, "'rope_parameters.rope_type' is 'xxxxx"),
        ({"torch_dtype": "float33"}, "'torch_dtype' is 'float33', not a torch dtype"),
        ({"torch_dtype": None, "dtype": "bfloat15"}, "'dtype' is 'bfloat15', not a torch dtype"),
    ],
)  # fmt: skip
def test_an_unknown_rope_type_or_dtype_is_refused(src, tmp_path, changes, needle):
    _edit_config(src, **changes)
    refused(src, tmp_path, ["--tp", "2"], f"{src / 'config.json'}", needle, "Fix config.json")


def test_an_fp8_config_over_plain_weights_is_refused(src, tmp_path):
    _edit_config(src, quantization_config=SCHEMES["fp8_block"])
    refused(
        src, tmp_path, ["--tp", "2"],
        f"{src}: config.json's 'quantization_config' says fp8_block",
        "no weight_scale_inv next to any weight",
        "Remove quantization_config from config.json, or re-download the quantized weights",
    )  # fmt: skip


def test_an_fp8_norm_with_a_scale_is_refused(tmp_path):
    model, _ = write_quantized(tmp_path / "q", "fp8_block")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    tensors = load_file(model / shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    tensors["model.norm.weight_scale_inv"] = torch.ones(1)
    save_file(tensors, model / shard, {"format": "pt"})
    index["weight_map"]["model.norm.weight_scale_inv"] = shard
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(
        model, tmp_path, ["--tp", "2"],
        "tensor 'model.norm.weight' is F8_E4M3 [64] with quantization parts",
        "only 2-D linear weights are quantized", "re-download it",
    )  # fmt: skip


# --- side files are covered by verify --level hashes -----------------------------------------


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_an_edited_side_file_fails_the_hashes_tier(out, name):
    (out / name).write_text((out / name).read_text().replace("}", ', "edited": 1}', 1))
    result = cli("verify", out, "--level", "hashes")
    assert result.exit_code == 1, result.output
    assert f"{out / name}: hash " in result.output
    assert f"!= manifest side_files['{name}']" in result.output
    (out / name).unlink()
    result = cli("verify", out, "--level", "hashes")
    assert result.exit_code == 1 and f"{out / name}: missing" in result.output


def test_the_hashes_tier_says_what_it_covered(out):
    result = cli("verify", out, "--level", "hashes")
    assert result.exit_code == 0, result.output
    assert "tensors in 2 files, 2 side files" in result.output


# --- Ctrl-C during the commit ----------------------------------------------------------------


def _sigint_after_manifest(monkeypatch):
    import reshard.convert as convert

    real = convert.write_manifest

    def write_then_interrupt(*args, **kwargs):
        path = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands just after the manifest
        return path

    monkeypatch.setattr(convert, "write_manifest", write_then_interrupt)


@pytest.mark.parametrize("ranks", [None, "0-1"])
def test_ctrl_c_just_after_the_manifest_says_the_output_is_complete(
    src, tmp_path, monkeypatch, ranks
):
    _sigint_after_manifest(monkeypatch)
    o = tmp_path / "o"
    extra = ["--ranks", ranks] if ranks else []
    result = cli("convert", src, "--tp", "2", "-o", o, "--quiet", *extra)
    assert result.exit_code == 130, result.output
    assert f"interrupted: the output in {o} was committed" in result.stderr
    assert "nothing was committed" not in result.stderr
    assert (o / "manifest.json").is_file() and not list(o.glob("reshard-rank-*.json"))
    monkeypatch.undo()
    assert cli("verify", o, "--level", "hashes").exit_code == 0


# --- a closed stdout, a full device ----------------------------------------------------------


def test_a_closed_stdout_is_one_line_naming_it(built):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reshard", "inspect", str(built[0])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    proc.stdout.close()  # the reader went away (`reshard inspect M | head -c0`)
    err = proc.stderr.read().decode()
    assert proc.wait() == 3, err
    assert err.startswith("error: standard output: Broken pipe") and err.count("\n") == 1, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_device_for_json_names_the_file(out):
    expect_error(
        cli("verify", out, "--level", "hashes", "--json", "/dev/full"),
        3,
        "/dev/full: No space left on device",
        "free space on that disk",
    )


@pytest.mark.parametrize(
    "args, flag",
    [
        (["plan", "{src}", "--tp", "2", "--context", DIGITS_400], "--context"),
        (["plan", "{src}", "--tp", "2", "--batch", DIGITS_400], "--batch"),
        (["plan", "{src}", "--tp", "2", "--gpu-memory", DIGITS_400], "--gpu-memory"),
        (["plan", "{src}", "--tp", "2", "--max-num-seqs", DIGITS_400], "--max-num-seqs"),
        (["profile", "layers", "{src}", "--batch", DIGITS_400, "-o", "{tmp}/c.json"], "--batch"),
        (["profile", "layers", "{src}", "--seq", DIGITS_400, "-o", "{tmp}/c.json"], "--seq"),
    ],
)
def test_plan_and_profile_numbers_are_bounded(src, tmp_path, args, flag):
    """Click's own range check (exit 2 naming the flag), not an OverflowError traceback."""
    before = digest_tree(src)
    args = [a.format(src=src, tmp=tmp_path) for a in args]
    result = cli(*args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}'" in result.output and "Traceback" not in result.output
    assert digest_tree(src) == before and not (tmp_path / "c.json").exists()


def test_ctrl_c_just_after_exports_index_says_it_is_complete(out, tmp_path, monkeypatch):
    import reshard.export as export

    real = export.write_atomic

    def write_then_interrupt(path, data):
        real(path, data)
        if path.name == "model.safetensors.index.json":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(export, "write_atomic", write_then_interrupt)
    hf = tmp_path / "hf"
    result = cli("export", out, "-o", hf)
    assert result.exit_code == 130, result.output
    assert f"interrupted: the output in {hf} was committed" in result.stderr
    assert (hf / "model.safetensors.index.json").is_file()


def test_a_manifest_without_side_files_says_they_are_not_covered(out):
    """A manifest written before side files were hashed: verify says what it did not check."""
    from reshard.io.manifest import write_manifest
    from reshard.io.seal import SEAL_KEY

    doc = json.loads((out / "manifest.json").read_text())
    del doc["side_files"], doc[SEAL_KEY]
    write_manifest(out, doc)
    result = cli("verify", out, "--level", "hashes")
    assert result.exit_code == 0, result.output
    assert "tensors in 2 files, side files NOT covered" in result.output


def test_profile_experts_max_new_tokens_past_the_positions(moe_config, tmp_path):
    """Refused from config.json alone, before any weight is read (there are none here)."""
    before = digest_tree(moe_config.parent)
    expect_error(
        cli(
            "profile", "experts", moe_config.parent, "--prompt-ids", "1,2",
            "--max-new-tokens", "100000", "-o", tmp_path / "load.json",
        ),
        2,
        f"--max-new-tokens 100000: {moe_config} holds 256 positions",
        "give at most 255",
    )  # fmt: skip
    assert digest_tree(moe_config.parent) == before and not (tmp_path / "load.json").exists()


def test_the_known_rope_types_and_dtypes_are_transformers_and_torchs_own():
    """The lists config.json is checked against come from the libraries, not from us."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from reshard.models.hparams import CONFIG_DTYPES, ROPE_TYPES

    assert set(ROPE_TYPES) == {"default", "su", *ROPE_INIT_FUNCTIONS}  # su: Phi-3's alias
    assert all(isinstance(getattr(torch, n), torch.dtype) for n in CONFIG_DTYPES - {"auto"})
