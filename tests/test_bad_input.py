"""Every error path a user can hit, asserted by exit code and by text: the message names the
file (or the numbers) and says the fix, and a failed convert leaves no manifest.json in OUT.

Headers are written by hand (the reference writer cannot produce most of these files); model
folders are one tiny transformers checkpoint per module, copied before each mutation.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from checkpoints import write_checkpoint
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from reshard.cli import main
from reshard.errors import CheckpointError, LayoutError
from reshard.headers import MAX_HEADER, read_header
from reshard.layout.check import check_layout
from reshard.layout.recipe import Recipe
from reshard.models.hparams import parse_hparams

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


# --- helpers -------------------------------------------------------------------------------


def cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def expect_exit(result: Result, code: int, *needles: str) -> str:
    """The CLI exited with `code` through its own error path (no stray traceback), and its
    message holds every needle."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, result.output
    message = result.stderr if code != 1 else result.output
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def convert_fails(model: Path, out: Path, code: int, *needles: str, args=()) -> str:
    message = expect_exit(cli("convert", model, "-o", out, "--quiet", *args), code, *needles)
    assert message.startswith("error: ")
    assert not (out / "manifest.json").exists()
    return message


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_raw(path: Path, header, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file from a header (dict, or raw bytes) and data, written by hand."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def rewrite_tensors(path: Path, *, add=None, drop=()) -> None:
    """Add and drop tensors of a safetensors file, through safetensors' own writer."""
    tensors = load_file(path)
    tensors.update(add or {})
    for name in drop:
        del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


def edit_index(model: Path, *, point=None, drop=()) -> None:
    """Point index entries at other files (tensor -> file name) and drop entries."""
    index = json.loads((model / INDEX).read_text())
    index["weight_map"].update(point or {})
    for name in drop:
        del index["weight_map"][name]
    (model / INDEX).write_text(json.dumps(index))


# --- fixtures: one checkpoint of each kind per module ----------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("single") / "llama")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("sharded") / "llama", shard_size="100KB")


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "out"
    result = cli("convert", model_dir, "-o", out, "--tp", "2", "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def model(model_dir, tmp_path) -> Path:
    return copy_model(model_dir, tmp_path / "model")


@pytest.fixture
def sharded(sharded_dir, tmp_path) -> Path:
    return copy_model(sharded_dir, tmp_path / "model")


# --- safetensors headers -------------------------------------------------------------------

F32_4 = entry("F32", [4], 0, 16)

# name -> (header, data, header length override or None, expected message fragment)
BAD_HEADERS = {
    "header_longer_than_file": (b"{}", b"", 1000, "is larger than the file"),
    "header_over_100MB": (b"{}", b"", MAX_HEADER + 1, f"exceeds the {MAX_HEADER}-byte limit"),
    "invalid_json": (b'{"w": {"dtype": "F32",', b"", None, "header is not valid JSON"),
    "non_utf8": (b'{"\xff\xfe": {}}', b"", None, "not valid UTF-8 (byte 0xff at offset 2)"),
    "not_an_object": (b"[1, 2]", b"", None, "not a JSON object"),
    "duplicate_names": (
        b'{"w": ' + json.dumps(F32_4).encode() + b', "w": ' + json.dumps(F32_4).encode() + b"}",
        bytes(16),
        None,
        "key 'w' appears twice",
    ),
    "unknown_dtype": ({"w": entry("F17", [4], 0, 16)}, bytes(16), None, "unknown dtype 'F17'"),
    "lowercase_dtype": ({"w": entry("f32", [4], 0, 16)}, bytes(16), None, "unknown dtype 'f32'"),
    "shape_times_dtype_mismatch": (
        {"w": entry("F32", [4], 0, 12)},
        bytes(12),
        None,
        "needs 16 bytes but its offsets span 12",
    ),
    # Refused as the reference refuses it, not wrapped around.
    "shape_product_overflows_u64": (
        {"w": entry("F32", [2**62, 2**62], 0, 16)},
        bytes(16),
        None,
        "overflows a 64-bit byte count",
    ),
    "negative_shape": ({"w": entry("F32", [-4], 0, 16)}, bytes(16), None, "bad shape [-4]"),
    "float_shape": ({"w": entry("F32", [4.0], 0, 16)}, bytes(16), None, "bad shape [4.0]"),
    "reversed_offsets": ({"w": entry("F32", [4], 16, 0)}, bytes(16), None, "bad data_offsets"),
    "missing_offsets": ({"w": {"dtype": "F32", "shape": [4]}}, bytes(16), None, "data_offsets"),
    "entry_not_an_object": ({"w": [1, 2]}, bytes(16), None, "header entry is not an object"),
    "gap": (
        {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 20, 36)},
        bytes(36),
        None,
        "tensor 'b' starts at data offset 20, expected 16: it leaves a gap",
    ),
    "gap_at_start": ({"a": entry("F32", [4], 8, 24)}, bytes(24), None, "leaves a gap"),
    "overlap": (
        {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)},
        bytes(24),
        None,
        "tensor 'b' starts at data offset 8, expected 16: it overlaps the previous tensor",
    ),
    "trailing_bytes": (
        {"w": F32_4},
        bytes(20),
        None,
        "describes",  # checked in full below
    ),
    "empty_name": ({"": F32_4}, bytes(16), None, "odd characters"),
    "name_with_newline": ({"w\n": F32_4}, bytes(16), None, "odd characters"),
    "name_with_nul": ({"w\x00": F32_4}, bytes(16), None, "odd characters"),
    "name_with_spaces": ({" w": F32_4}, bytes(16), None, "odd characters"),
    "metadata_not_str_to_str": (
        {"__metadata__": {"format": 1}, "w": F32_4},
        bytes(16),
        None,
        "__metadata__ must map strings to strings",
    ),
    "metadata_a_list": (
        {"__metadata__": ["format", "pt"], "w": F32_4},
        bytes(16),
        None,
        "__metadata__ must map strings to strings",
    ),
    "metadata_an_empty_list": (
        {"__metadata__": [], "w": F32_4},
        bytes(16),
        None,
        "__metadata__ must map strings to strings",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header_is_rejected_naming_the_file(case, tmp_path):
    header, data, length, fragment = BAD_HEADERS[case]
    path = write_raw(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message
    assert "re-download" in message.lower() or "re-export" in message, message  # the fix


def test_trailing_bytes_names_both_sizes(tmp_path):
    path = write_raw(tmp_path / "bad.safetensors", {"w": F32_4}, bytes(20))
    size = path.stat().st_size
    with pytest.raises(
        CheckpointError, match=f"describes {size - 4} bytes but the file has {size}"
    ):
        read_header(path)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_8_bytes(size, tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(CheckpointError, match=rf"{size} bytes is too short.*re-download"):
        read_header(path)


def test_metadata_absent_or_null_is_fine(tmp_path):
    for metadata in ({}, {"__metadata__": None}, {"__metadata__": {"format": "pt"}}):
        path = write_raw(tmp_path / "ok.safetensors", {**metadata, "w": F32_4}, bytes(16))
        header = read_header(path)
        assert list(header.tensors) == ["w"] and header.tensors["w"].nbytes == 16


def test_real_checkpoint_header_passes(model_dir):
    header = read_header(model_dir / SINGLE)
    assert "model.embed_tokens.weight" in header.tensors
    assert header.size == (model_dir / SINGLE).stat().st_size


def test_truncated_checkpoint_fails_convert(model, tmp_path):
    path = model / SINGLE
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    convert_fails(
        model,
        tmp_path / "out",
        2,
        str(path),
        f"the file has {size - 10}",
        "truncated",
        "re-download",
    )


def test_corrupt_header_in_a_shard_fails_convert(sharded, tmp_path):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    raw = victim.read_bytes()
    victim.write_bytes(raw[:8] + b"X" + raw[9:])  # first byte of the JSON
    convert_fails(sharded, tmp_path / "out", 2, str(victim), "header is not valid JSON")


# --- the index -----------------------------------------------------------------------------

ATTN_Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    "target", ["../x.safetensors", "/etc/x.safetensors", "sub/x.safetensors", "..", ""]
)
def test_index_entry_outside_the_folder(sharded, tmp_path, target):
    edit_index(sharded, point={ATTN_Q0: target})
    convert_fails(
        sharded,
        tmp_path / "out",
        2,
        str(sharded / INDEX),
        f"points to {target!r}",
        "not a plain file name",
    )


def test_index_entry_outside_the_folder_is_refused_even_if_it_exists(sharded, tmp_path):
    shutil.copy(sharded / "model-00001-of-00005.safetensors", tmp_path / "outside.safetensors")
    edit_index(sharded, point={ATTN_Q0: "../outside.safetensors"})
    convert_fails(sharded, tmp_path / "out", 2, "not a plain file name")


def test_index_names_a_missing_file(sharded, tmp_path):
    (sharded / "model-00003-of-00005.safetensors").unlink()
    convert_fails(
        sharded,
        tmp_path / "out",
        2,
        str(sharded / INDEX),
        "model-00003-of-00005.safetensors, which is missing",
        "Download the missing shard",
    )


def test_index_says_file_a_but_tensor_is_in_b(sharded, tmp_path):
    index = json.loads((sharded / INDEX).read_text())
    actual = index["weight_map"][ATTN_Q0]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != actual)
    edit_index(sharded, point={ATTN_Q0: wrong})
    convert_fails(
        sharded,
        tmp_path / "out",
        2,
        str(sharded / INDEX),
        f"says tensor '{ATTN_Q0}' is in {wrong}, but it is in {actual}",
        "re-download",
    )


def test_index_lists_a_tensor_no_file_has(sharded, tmp_path):
    ghost = "model.layers.0.self_attn.ghost.weight"
    edit_index(sharded, point={ghost: "model-00001-of-00005.safetensors"})
    convert_fails(sharded, tmp_path / "out", 2, f"tensor '{ghost}'", "but it is in no file")


def test_tensor_in_a_file_but_missing_from_the_index(sharded, tmp_path):
    edit_index(sharded, drop=[ATTN_Q0])
    convert_fails(
        sharded,
        tmp_path / "out",
        2,
        str(sharded / INDEX),
        f"tensor '{ATTN_Q0}'",
        "missing from the index",
        "Re-download the index",
    )


def test_same_tensor_in_two_files(sharded, tmp_path):
    index = json.loads((sharded / INDEX).read_text())
    home = index["weight_map"][ATTN_Q0]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != home)
    q = load_file(sharded / home)[ATTN_Q0]
    rewrite_tensors(sharded / other, add={ATTN_Q0: q})
    convert_fails(
        sharded,
        tmp_path / "out",
        2,
        f"tensor '{ATTN_Q0}' is in both",
        home,
        other,
        "Remove the stale file",
    )


def test_index_that_is_not_json(sharded, tmp_path):
    (sharded / INDEX).write_text("{not json")
    convert_fails(sharded, tmp_path / "out", 2, str(sharded / INDEX), "index is not valid JSON")


def test_index_without_weight_map(sharded, tmp_path):
    (sharded / INDEX).write_text(json.dumps({"metadata": {}}))
    convert_fails(sharded, tmp_path / "out", 2, str(sharded / INDEX), "no 'weight_map'")


def test_folder_without_weights(model, tmp_path):
    (model / SINGLE).unlink()
    convert_fails(model, tmp_path / "out", 2, str(model), "Download the weights too")


# --- pickle --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickle_dir(model_dir, tmp_path_factory) -> Path:
    """A real tiny Llama state dict saved with torch.save, next to its config.json."""
    folder = tmp_path_factory.mktemp("pickle") / "llama"
    folder.mkdir()
    shutil.copy(model_dir / "config.json", folder / "config.json")
    torch.save(load_file(model_dir / SINGLE), folder / "pytorch_model.bin")
    return folder


def test_pickle_is_refused_by_default(pickle_dir, tmp_path):
    message = convert_fails(
        pickle_dir, tmp_path / "out", 2, "pytorch_model.bin", "arbitrary code", "--allow-pickle"
    )
    assert str(pickle_dir) in message
    assert not (pickle_dir / ".reshard-pickle").exists()


def test_pickle_is_refused_by_inspect_too(pickle_dir):
    expect_exit(cli("inspect", pickle_dir), 2, "--allow-pickle")


@pytest.fixture(scope="module")
def pickle_converted(pickle_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pickle-out") / "out"
    result = cli("convert", pickle_dir, "-o", out, "--tp", "2", "--allow-pickle", "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_pickle_with_allow_pickle_converts_bitwise(pickle_converted, pickle_dir, model_dir):
    out = pickle_converted
    assert (out / "manifest.json").is_file()
    # the scratch conversion is cleaned up, and never written into the source
    assert not [p for p in out.parent.iterdir() if "pickle" in p.name]
    assert not [p for p in out.iterdir() if "pickle" in p.name]
    assert not [p for p in pickle_dir.iterdir() if "reshard" in p.name]
    source = load_file(model_dir / SINGLE)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry_ in manifest["ranks"]:
        shard = {}
        for name in entry_["files"]:
            shard.update(load_file(out / name))
        for name, meta in entry_["tensors"].items():
            for p in meta["pieces"]:
                src = source[p["source"]][tuple(slice(a, b) for a, b in zip(p["start"], p["stop"]))]
                dst = tuple(
                    slice(d, d + b - a) for d, a, b in zip(p["dest"], p["start"], p["stop"])
                )
                assert torch.equal(shard[name][dst].view(torch.uint8), src.view(torch.uint8))
    result = cli("verify", out, "--level", "hashes")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", ["bad_layout", "existing_output"])
def test_failed_pickle_convert_leaves_no_scratch_copy(pickle_dir, pickle_converted, tmp_path, case):
    if case == "bad_layout":
        out = tmp_path / "out"
        convert_fails(pickle_dir, out, 2, "tp=3", args=["--tp", 3, "--allow-pickle"])
    else:
        out = copy_model(pickle_converted, tmp_path / "out")
        expect_exit(
            cli("convert", pickle_dir, "-o", out, "--allow-pickle", "--quiet"), 2, "--force"
        )
    # the scratch conversion is a full copy of the weights (140 GB for a 70B model)
    assert not [p for p in out.parent.iterdir() if "pickle" in p.name]
    assert not out.exists() or not [p for p in out.iterdir() if "pickle" in p.name]


def test_pickle_output_passes_verify_weights(pickle_converted):
    result = cli("verify", pickle_converted, "--level", "hashes", "--level", "weights")
    assert result.exit_code == 0, result.output


# --- config.json vs the weights --------------------------------------------------------------


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def test_unknown_architecture(model, tmp_path):
    edit_config(model, architectures=["GPT2LMHeadModel"])
    convert_fails(
        model,
        tmp_path / "out",
        2,
        str(model / "config.json"),
        "GPT2LMHeadModel",
        "is not supported",
        "LlamaForCausalLM",
        "MixtralForCausalLM",
        "Qwen3MoeForCausalLM",
    )


def test_missing_config(model, tmp_path):
    (model / "config.json").unlink()
    convert_fails(model, tmp_path / "out", 2, str(model / "config.json"), "no config.json")


def test_config_not_json(model, tmp_path):
    (model / "config.json").write_text("{")
    convert_fails(model, tmp_path / "out", 2, str(model / "config.json"), "not valid JSON")


def test_config_missing_a_required_key(model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    del config["hidden_size"]
    (model / "config.json").write_text(json.dumps(config))
    convert_fails(model, tmp_path / "out", 2, "missing 'hidden_size'")


def test_weights_name_a_layer_past_num_hidden_layers(model, tmp_path):
    rewrite_tensors(model / SINGLE, add={"model.layers.5.input_layernorm.weight": torch.ones(64)})
    convert_fails(
        model,
        tmp_path / "out",
        2,
        str(model),
        "'model.layers.5.input_layernorm.weight' names layer 5",
        "num_hidden_layers=3",
        "disagree",
    )


def test_config_with_fewer_layers_than_the_weights(model, tmp_path):
    edit_config(model, num_hidden_layers=2)
    convert_fails(model, tmp_path / "out", 2, "names layer 2", "num_hidden_layers=2")


def test_missing_required_tensor(model, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite_tensors(model / SINGLE, drop=[name])
    convert_fails(
        model, tmp_path / "out", 2, str(model), f"required tensor '{name}'", "re-download"
    )


def test_missing_lm_head_without_tied_embeddings(model, tmp_path):
    rewrite_tensors(model / SINGLE, drop=["lm_head.weight"])
    convert_fails(model, tmp_path / "out", 2, "required tensor 'lm_head.weight'")


def test_unknown_extra_tensor(model, tmp_path):
    name = "model.layers.0.foo.weight"
    rewrite_tensors(model / SINGLE, add={name: torch.zeros(4)})
    convert_fails(
        model,
        tmp_path / "out",
        2,
        str(model),
        f"tensor '{name}' matches 0 rules",
        "LlamaForCausalLM",
        "open an issue",
    )


# --- layouts -------------------------------------------------------------------------------


def hparams(**overrides):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 4,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "vocab_size": 1000,
        **overrides,
    }
    return parse_hparams(config)


def test_tp_not_dividing_heads(model, tmp_path):
    convert_fails(
        model,
        tmp_path / "out",
        2,
        "tp=3",
        "num_attention_heads=4 is not divisible by tp=3",
        "Valid tp for this model: 1, 2, 4.",
        args=("--tp", "3"),
    )


def test_kv_heads_neither_dividing_nor_divisible():
    with pytest.raises(LayoutError) as e:
        check_layout(hparams(), Recipe(tp=6))  # 12 q heads split 6 ways, but 4 kv heads
    message = str(e.value)
    assert "num_key_value_heads=4 neither divides nor is divisible by tp=6" in message
    assert "num_attention_heads" not in message  # 12 % 6 == 0: only the real problem
    assert "Valid tp for this model: 1, 2, 4, 12." in message


def test_kv_heads_fewer_than_tp_are_replicated_not_refused():
    check_layout(hparams(), Recipe(tp=12))  # 12 % 4 == 0: each kv head on 3 ranks


def test_intermediate_size_not_divisible():
    with pytest.raises(LayoutError, match="intermediate_size=3070 is not divisible by tp=4"):
        check_layout(hparams(intermediate_size=3070), Recipe(tp=4))


def test_pp_larger_than_the_layers(model, tmp_path):
    convert_fails(
        model, tmp_path / "out", 2, "pp=4 exceeds the 3 decoder layers", "pp <= 3", args=["--pp", 4]
    )


def test_ep_on_a_dense_model(model, tmp_path):
    convert_fails(
        model,
        tmp_path / "out",
        2,
        "ep=2",
        "LlamaForCausalLM is dense",
        "Drop --ep",
        args=["--tp", 2, "--ep", 2],
    )


def test_ep_not_dividing_tp(model, tmp_path):
    convert_fails(
        model,
        tmp_path / "out",
        2,
        "ep=3 must divide tp=4",
        "Valid ep: [1, 2, 4]",
        args=["--tp", 4, "--ep", 3],
    )


@pytest.mark.parametrize("flag", ["--tp", "--pp", "--dp", "--ep"])
def test_degree_must_be_positive(model, tmp_path, flag):
    message = f"{flag[2:]} must be a positive integer, got 0"
    convert_fails(model, tmp_path / "out", 2, message, args=[flag, 0])


def test_existing_output_needs_force(model, converted, tmp_path):
    out = copy_model(converted, tmp_path / "out")
    before = (out / "manifest.json").read_bytes()
    message = expect_exit(
        cli("convert", model, "-o", out, "--tp", "2", "--quiet"), 2, str(out), "--force"
    )
    assert "manifest.json" in message
    assert (out / "manifest.json").read_bytes() == before  # untouched
    result = cli("convert", model, "-o", out, "--tp", "2", "--quiet", "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["layout"]["tp"] == 2
    assert cli("verify", out, "--level", "hashes").exit_code == 0


def test_force_replacing_with_fewer_ranks_leaves_no_stale_rank_files(model, converted, tmp_path):
    out = copy_model(converted, tmp_path / "out")
    result = cli("convert", model, "-o", out, "--quiet", "--force")  # tp 2 -> tp 1
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("rank-*")) == ["rank-00000.safetensors"]


# --- verify --------------------------------------------------------------------------------


def test_verify_without_manifest(model_dir):
    message = expect_exit(cli("verify", model_dir), 2, str(model_dir / "manifest.json"))
    assert "Re-run reshard convert" in message


def test_verify_missing_folder(tmp_path):
    expect_exit(cli("verify", tmp_path / "nowhere"), 2, str(tmp_path / "nowhere"), "no such")


def test_verify_missing_rank_file(converted, tmp_path):
    out = copy_model(converted, tmp_path / "out")
    (out / "rank-00001.safetensors").unlink()
    expect_exit(
        cli("verify", out, "--level", "hashes"),
        2,
        str(out / "rank-00001.safetensors"),
        "missing (rank 1)",
        "re-run reshard convert",
    )


def test_verify_flipped_byte_names_file_and_tensor(converted, tmp_path):
    out = copy_model(converted, tmp_path / "out")
    path = out / "rank-00001.safetensors"
    name = "model.layers.1.self_attn.k_proj.weight"
    info = read_header(path).tensors[name]
    with open(path, "r+b") as f:
        f.seek(info.begin + info.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    result = cli("verify", out, "--level", "hashes")
    assert result.exit_code == 1, result.output
    assert f"{path}: tensor '{name}' (rank 1)" in result.output
    assert "corrupt" in result.output
    assert result.output.count("tensor '") == 1  # only the one tensor


def test_verify_truncated_rank_file(converted, tmp_path):
    out = copy_model(converted, tmp_path / "out")
    path = out / "rank-00000.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1)
    result = cli("verify", out, "--level", "hashes")
    assert result.exit_code == 1, result.output
    assert f"{path}: {size - 1} bytes, the manifest says {size}" in result.output


def test_verify_corrupt_manifest(converted, tmp_path):
    out = copy_model(converted, tmp_path / "out")
    (out / "manifest.json").write_text("{")
    expect_exit(cli("verify", out), 2, str(out / "manifest.json"), "not valid JSON")


# --- I/O failures --------------------------------------------------------------------------


def test_output_inside_a_regular_file(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    convert_fails(model, out, 3, str(out))


def test_no_such_model():
    expect_exit(cli("convert", "./no/such/model/dir", "-o", "x"), 2, "no such folder")


def test_model_that_is_a_file(model, tmp_path):
    expect_exit(cli("convert", model / SINGLE, "-o", tmp_path / "o"), 2, "is a file")
