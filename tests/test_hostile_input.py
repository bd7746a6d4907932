"""A named corpus of hostile and careless inputs (issue 10, the input side): inputs that used
to crash with a traceback, inputs safetensors' own reader refuses, config.json values that
contradict the tensors, and unreadable files. Each case is a copy of a tiny real checkpoint
with one defect. `reshard convert` (and `inspect` and `plan`, where the defect is in what they
read) must exit with the documented code and one line naming the file and the tensor or key,
write no manifest.json, and leave the source folder byte-identical.

Also here: the drop of `rotary_emb.inv_freq` in the reference, and NaN weights in generate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoints import write_checkpoint
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from reshard.cli import main
from reshard.runtime.generate import PromptResult
from reshard.verify.compare import Tolerance, compare_prompt

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
NORM = "model.norm.weight"
K1 = "model.layers.1.self_attn.k_proj.weight"
RAW = "__RAW__"  # placeholder replaced by raw JSON text no Python value serialises to


# --- editing files below the JSON layer ------------------------------------------------------


def json_with_raw(doc, raw: str | bytes) -> bytes:
    """JSON text of `doc` with the first RAW string replaced by `raw` (bytes stay as given:
    a stray 0xff byte, which no JSON writer produces)."""
    raw = raw if isinstance(raw, bytes) else raw.encode()
    return json.dumps(doc).encode().replace(f'"{RAW}"'.encode(), raw, 1)


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_safetensors(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def edit_header(model: Path, edit: Callable[[dict, int], None], raw: str | bytes = "", file=SINGLE):
    """Apply `edit(header, data_length)` to a shard's header; RAW in it becomes `raw`."""
    path = model / file
    header, data = read_safetensors(path)
    edit(header, len(data))
    write_safetensors(
        path, json_with_raw(header, raw) if raw else json.dumps(header).encode(), data
    )
    return path


def set_field(tensor: str, field: str, value=RAW):
    def edit(header: dict, _):
        header[tensor][field] = value

    return edit


def add_zero_size(shape):
    """A zero-byte tensor at the end of the data, where the reference accepts one."""

    def edit(header: dict, end: int):
        header["model.zero"] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}

    return edit


def edit_json(
    path: Path, edit: Callable[[dict], None] | None = None, raw: str | bytes = ""
) -> Path:
    doc = json.loads(path.read_bytes())
    if edit is not None:
        edit(doc)
    path.write_bytes(json_with_raw(doc, raw) if raw else json.dumps(doc).encode())
    return path


def config(**changes):
    """Set config.json keys; a value RAW is spliced in as raw text."""

    def mutate(model: Path, raw: str | bytes = "") -> Path:
        return edit_json(model / "config.json", lambda c: c.update(changes), raw)

    return mutate


def raw_file(name: str, blob: bytes):
    def mutate(model: Path) -> Path:
        (model / name).write_bytes(blob)
        return model / name

    return mutate


def index_shard(model: Path) -> str:
    return json.loads((model / INDEX).read_text())["weight_map"][NORM]


def rewrite(tensors: dict[str, torch.Tensor | None], file=SINGLE):
    """Replace (or with None drop) tensors through safetensors' own writer."""

    def mutate(model: Path) -> Path:
        state = load_file(model / file)
        for name, value in tensors.items():
            state.pop(name) if value is None else state.__setitem__(name, value)
        save_file(state, model / file, metadata={"format": "pt"})
        return model / file

    return mutate


def one_layer_in(dtype: torch.dtype):
    def mutate(model: Path) -> Path:
        state = load_file(model / SINGLE)
        for name in [n for n in state if n.startswith("model.layers.1.")]:
            state[name] = state[name].to(dtype)
        save_file(state, model / SINGLE, metadata={"format": "pt"})
        return model / SINGLE

    return mutate


# --- the corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    cls: str  # the class: 1 traceback, 2 permissive, 3 config vs tensors, 7 permissions
    model: str  # fixture: single | sharded | moe
    mutate: Callable[[Path], Path]  # returns the file the message must name
    needles: tuple[str, ...]  # the tensor or key, and what is wrong
    code: int = 2


def header(edit, raw: str | bytes = ""):
    return lambda model: edit_header(model, edit, raw)


def index(edit=None, raw: str | bytes = ""):
    return lambda model: edit_json(model / INDEX, edit, raw)


def cfg(raw: str | bytes = "", **changes):
    return lambda model: config(**changes)(model, raw)


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


BIG_INT = "7" * 5000  # past Python's int() digit limit, and past a double
SURROGATE = '"\\ud800"'

CORPUS: dict[str, Case] = {
    # 1: safetensors headers that crashed with a traceback
    "header_int_of_5000_digits": Case("1", "single", header(set_field(NORM, "shape"), f"[{BIG_INT}]"), (NORM, "5000 digits")),  # noqa: E501
    "header_nesting_1000_deep": Case("1", "single", header(set_field(NORM, "extra"), deep(1000)), (NORM, "nests deeper than 127")),  # noqa: E501
    "header_dtype_a_list": Case("1", "single", header(set_field(NORM, "dtype", ["F32"])), (NORM, "unknown dtype ['F32']")),  # noqa: E501
    "header_dtype_an_object": Case("1", "single", header(set_field(NORM, "dtype", {"a": 1})), (NORM, "unknown dtype {'a': 1}")),  # noqa: E501
    "header_shape_a_string": Case("1", "single", header(set_field(NORM, "shape", "64")), (NORM, "bad shape '64'")),  # noqa: E501
    "header_offsets_null": Case("1", "single", header(set_field(NORM, "data_offsets", None)), (NORM, "bad data_offsets None")),  # noqa: E501
    "header_non_utf8_value": Case("1", "single", header(set_field(NORM, "extra"), b'"\xff"'), (NORM, "not valid UTF-8 (byte 0xff")),  # noqa: E501
    # 2: what the safetensors reference refuses
    "header_nan_offset": Case("2", "single", header(set_field(NORM, "data_offsets"), "[0, NaN]"), (f"{NORM}.data_offsets.1", "NaN is not JSON")),  # noqa: E501
    "header_infinity_in_shape": Case("2", "single", header(set_field(NORM, "shape"), "[Infinity]"), (f"{NORM}.shape.0", "Infinity is not JSON")),  # noqa: E501
    "header_minus_infinity_extra": Case("2", "single", header(set_field(NORM, "extra"), "-Infinity"), (f"{NORM}.extra", "-Infinity is not JSON")),  # noqa: E501
    "header_1e999_extra": Case("2", "single", header(set_field(NORM, "extra"), "1e999"), (f"{NORM}.extra", "overflows a double")),  # noqa: E501
    "header_nesting_126_extra": Case("2", "single", header(set_field(NORM, "extra"), deep(126)), (NORM, "nests deeper than 127")),  # noqa: E501
    "header_lone_surrogate_metadata": Case("2", "single", header(lambda h, _: h["__metadata__"].update(format=RAW), SURROGATE), ("__metadata__.format", "lone surrogate")),  # noqa: E501
    "header_lone_surrogate_extra": Case("2", "single", header(set_field(NORM, "extra"), SURROGATE), (f"{NORM}.extra", "lone surrogate")),  # noqa: E501
    "header_zero_size_dim_2_64": Case("2", "single", header(add_zero_size([0, 2**64])), ("model.zero", "bad shape [0, 18446744073709551616]")),  # noqa: E501
    "header_zero_size_product_overflow": Case("2", "single", header(add_zero_size([2**32, 2**32, 0])), ("model.zero", "overflows a 64-bit byte count")),  # noqa: E501
    "header_minus_zero_offset": Case("2", "single", header(set_field("lm_head.weight", "data_offsets"), "[-0, 25856]"), ("lm_head.weight", "bad data_offsets [-0.0")),  # noqa: E501
    "header_int_past_u64_offset": Case("2", "single", header(set_field(NORM, "data_offsets", [0, 2**64])), (NORM, "bad data_offsets")),  # noqa: E501
    "header_bool_in_shape": Case("2", "single", header(set_field(NORM, "shape", [True])), (NORM, "bad shape [True]")),  # noqa: E501
    # 1 + 2: the index
    "index_a_list": Case("1", "sharded", raw_file(INDEX, b"[]"), ("'weight_map'",)),
    "index_weight_map_value_an_int": Case("1", "sharded", index(lambda d: d["weight_map"].update({NORM: 5})), (NORM, "points to 5")),  # noqa: E501
    "index_non_utf8": Case("1", "sharded", index(lambda d: d["metadata"].update(x=RAW), b'"\xff"'), ("'metadata.x'", "not valid UTF-8")),  # noqa: E501
    "index_nesting_1000": Case("1", "sharded", index(lambda d: d["metadata"].update(x=RAW), deep(1000)), ("'metadata.x'", "nests deeper")),  # noqa: E501
    "index_int_of_5000_digits": Case("1", "sharded", index(lambda d: d["metadata"].update(total_size=RAW), BIG_INT), ("'metadata.total_size'", "5000 digits")),  # noqa: E501
    "index_nan": Case("2", "sharded", index(lambda d: d["metadata"].update(total_size=RAW), "NaN"), ("'metadata.total_size'", "NaN is not JSON")),  # noqa: E501
    "index_lone_surrogate_key": Case("2", "sharded", index(lambda d: d["weight_map"].update({RAW: "x"}), SURROGATE), ("weight_map", "lone surrogate")),  # noqa: E501
    "index_duplicate_key": Case("2", "sharded", index(lambda d: d["weight_map"].update(x=RAW), f'"a", "{NORM}": "a"'), (NORM, "appears twice")),  # noqa: E501
    # 1: config.json values that crashed inspect / plan / convert
    "config_hidden_size_null": Case("1", "single", cfg(hidden_size=None), ("'hidden_size' is null",)),  # noqa: E501
    "config_hidden_size_a_string": Case("1", "single", cfg(hidden_size="64"), ("'hidden_size' is '64'", "integer")),  # noqa: E501
    "config_architectures_5": Case("1", "single", cfg(architectures=5), ("'architectures' is 5", "list of strings")),  # noqa: E501
    "config_rms_norm_eps_x": Case("1", "single", cfg(rms_norm_eps="x"), ("'rms_norm_eps' is 'x'",)),  # noqa: E501
    "config_heads_0_no_head_dim": Case("1", "single", cfg(num_attention_heads=0, head_dim=None), ("'num_attention_heads' is 0", ">= 1")),  # noqa: E501
    "config_rope_scaling_a_list": Case("1", "single", cfg(rope_parameters=None, rope_scaling=[1]), ("'rope_scaling' is [1]", "an object")),  # noqa: E501
    "config_rope_llama3_without_factor": Case("1", "single", cfg(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), ("'rope_parameters.factor' is None",)),  # noqa: E501
    "config_an_empty_list": Case("1", "single", raw_file("config.json", b"[]"), ("config.json is a JSON list",)),  # noqa: E501
    "config_non_utf8": Case("1", "single", cfg(b'"\xfe"', hidden_act=RAW), ("'hidden_act'", "not valid UTF-8")),  # noqa: E501
    "config_nan_eps": Case("2", "single", cfg("NaN", rms_norm_eps=RAW), ("'rms_norm_eps'", "NaN is not JSON")),  # noqa: E501
    "config_1e999_theta": Case("2", "single", cfg("1e999", rope_theta=RAW), ("'rope_theta'", "overflows a double")),  # noqa: E501
    "config_nesting_200": Case("1", "single", cfg(deep(200), task_specific_params=RAW), ("'task_specific_params'", "nests deeper")),  # noqa: E501
    "config_tie_embeddings_a_string": Case("1", "single", cfg(tie_word_embeddings="false"), ("'tie_word_embeddings' is 'false'", "true or false")),  # noqa: E501
    "config_kv_heads_not_dividing": Case("1", "single", cfg(num_key_value_heads=3), ("num_attention_heads=4", "num_key_value_heads=3")),  # noqa: E501
    "config_vocab_0": Case("1", "single", cfg(vocab_size=0), ("'vocab_size' is 0",)),
    "config_hidden_size_400_digits": Case("1", "single", cfg("9" * 400, hidden_size=RAW), ("'hidden_size'", "400 digits")),  # noqa: E501
    "config_layer_types_wrong_length": Case("1", "single", cfg(sliding_window=16, layer_types=["full_attention"]), ("'layer_types'", "3 layers")),  # noqa: E501
    # 3: config.json against the tensors
    "vocab_one_less_than_embedding": Case("3", "single", cfg(vocab_size=100), ("lm_head.weight", "vocab_size=100", "has 101 in dim 0")),  # noqa: E501
    "heads_doubled": Case("3", "single", cfg(num_attention_heads=8), ("model.layers.0.self_attn.o_proj.weight", "num_attention_heads=8 x head_dim=16", "has 64 in dim 1", "implies 128")),  # noqa: E501
    "hidden_size_doubled": Case("3", "single", cfg(hidden_size=128), ("lm_head.weight", "hidden_size=128", "has 64 in dim 1")),  # noqa: E501
    "intermediate_size_off_by_two": Case("3", "single", cfg(intermediate_size=98), ("model.layers.0.mlp.down_proj.weight", "intermediate_size=98", "has 96 in dim 1")),  # noqa: E501
    "kv_heads_4_not_2": Case("3", "single", cfg(num_key_value_heads=4), ("model.layers.0.self_attn.k_proj.weight", "num_key_value_heads=4", "implies 64")),  # noqa: E501
    "head_dim_32": Case("3", "single", cfg(head_dim=32), ("model.layers.0.self_attn.k_proj.weight", "num_key_value_heads=2 x head_dim=32", "has 32 in dim 0", "implies 64")),  # noqa: E501
    "norm_shorter_than_hidden": Case("3", "single", rewrite({NORM: torch.ones(63)}), (NORM, "has 63 in dim 0", "hidden_size=64")),  # noqa: E501
    "norm_with_an_extra_dim": Case("3", "single", rewrite({NORM: torch.ones(1, 64)}), (NORM, "shape [1, 64]", "[64]")),  # noqa: E501
    "k_proj_one_row_short": Case("3", "single", rewrite({K1: torch.ones(31, 64)}), (K1, "has 31 in dim 0", "implies 32")),  # noqa: E501
    "lm_head_one_row_short": Case("3", "single", rewrite({"lm_head.weight": torch.ones(100, 64)}), ("lm_head.weight", "vocab_size=101", "has 100")),  # noqa: E501
    "one_layer_in_float16": Case("3", "single", one_layer_in(torch.float16), ("model.layers.1.", "is F16 but", "are F32", "--dtype")),  # noqa: E501
    "norm_in_int32": Case("3", "single", rewrite({NORM: torch.ones(64, dtype=torch.int32)}), (NORM, "is I32", "float dtype")),  # noqa: E501
    "moe_expert_width_off": Case("3", "moe", cfg(moe_intermediate_size=34), ("model.layers.0.mlp.experts.0.down_proj.weight", "moe_intermediate_size=34", "has 32 in dim 1")),  # noqa: E501
    "moe_shared_expert_width_off": Case("3", "moe", cfg(shared_expert_intermediate_size=40), ("model.layers.0.mlp.shared_expert.down_proj.weight", "shared_expert_intermediate_size=40", "has 48 in dim 1")),  # noqa: E501
    "moe_router_rows_not_num_experts": Case("3", "moe", rewrite({"model.layers.1.mlp.gate.weight": torch.ones(3, 64)}), ("model.layers.1.mlp.gate.weight", "num_experts=4", "has 3 in dim 0")),  # noqa: E501
    "config_top_k_over_experts": Case("1", "moe", cfg(num_experts_per_tok=5), ("num_experts_per_tok=5", "num_experts=4")),  # noqa: E501
    # 7: permissions are I/O failures
    "unreadable_config": Case("7", "single", lambda m: m / "config.json", ("cannot read", "ermission"), code=3),  # noqa: E501
    "unreadable_index": Case("7", "sharded", lambda m: m / INDEX, ("cannot read", "ermission"), code=3),  # noqa: E501
    "unreadable_shard": Case("7", "sharded", lambda m: m / index_shard(m), ("cannot read", "ermission"), code=3),  # noqa: E501
}  # fmt: skip


# --- fixtures and the per-case contract -------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hostile")
    return {
        "single": write_checkpoint(base / "single"),
        "sharded": write_checkpoint(base / "sharded", shard_size="100KB"),
        "moe": write_checkpoint(base / "moe", "Qwen2MoeForCausalLM"),
    }


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode("utf-8", "surrogateescape"))
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def unreadable(path: Path):
    """chmod 000 on `path`; as root (which reads anything) also drop to nobody meanwhile."""
    path.chmod(0)
    root = os.geteuid() == 0
    try:
        if root:
            os.seteuid(65534)
        yield
    finally:
        if root:
            os.seteuid(0)
        path.chmod(0o644)


@pytest.fixture
def workdir():
    """A folder every user can enter: the permission cases run as nobody when we are root."""
    folder = Path(tempfile.mkdtemp(prefix="reshard-hostile-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )  # a clean exit, never a traceback
    return result.exit_code, result.stderr


def check_refusal(code: int, stderr: str, case: Case, named: Path) -> None:
    assert code == case.code, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr  # one line
    assert str(named) in stderr, (str(named), stderr)
    for needle in case.needles:
        assert needle in stderr, (needle, stderr)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_input_is_refused_cleanly(name, sources, workdir):
    case = CORPUS[name]
    model = shutil.copytree(sources[case.model], workdir / "model")
    for path in [workdir, *workdir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    named = case.mutate(model)
    before = folder_digest(model)
    out = workdir / "out"
    with unreadable(named) if case.cls == "7" else contextlib.nullcontext():
        results = [run_cli("convert", model, "-o", out, "--tp", "2", "--quiet")]
        if case.cls != "3":  # inspect reads the same files; shapes are convert's check
            results.append(run_cli("inspect", model))
        if name.startswith("config_"):  # plan reads config.json (and no weights)
            results.append(run_cli("plan", model, "--tp", "2"))
    for code, stderr in results:
        check_refusal(code, stderr, case, named)
    assert not (out / "manifest.json").exists()
    assert folder_digest(model) == before  # the source is untouched


def test_corpus_covers_every_input_class():
    counts = {cls: sum(c.cls == cls for c in CORPUS.values()) for cls in "1237"}
    assert len(CORPUS) >= 40 and all(counts.values()), counts


def test_zero_size_tensors_the_reference_accepts_are_accepted(sources, tmp_path):
    """The boundary the permissive cases sit on: a dim of 2^64-1 beside a 0 is legal."""
    from safetensors import safe_open

    from reshard.headers import read_header

    model = shutil.copytree(sources["single"], tmp_path / "model")
    path = edit_header(model, add_zero_size([0, 2**64 - 1]))
    with safe_open(str(path), "pt") as f:
        assert tuple(f.get_slice("model.zero").get_shape()) == (0, 2**64 - 1)
    assert read_header(path).tensors["model.zero"].shape == (0, 2**64 - 1)


# --- generate: inv_freq and NaN ---------------------------------------------------------------


def test_inv_freq_and_nan_weights_convert_and_verify(sources, tmp_path):
    """An old export's rotary_emb.inv_freq (convert drops it: config.json derives it) and a NaN
    in the source weights. convert writes the NaN bitwise, and verify passes every tier: the
    reference drops inv_freq as convert does (no "unexpected inv_freq"), and NaN logits compare
    as NaN, with a note that the source itself gives them (not "max nan")."""
    model = shutil.copytree(sources["single"], tmp_path / "model")
    state = load_file(model / SINGLE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    dropped = [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(3)]
    state.update({name: inv_freq.clone() for name in dropped})
    state["model.embed_tokens.weight"][7, 0] = float("nan")  # token 7's embedding
    save_file(state, model / SINGLE, metadata={"format": "pt"})
    out = tmp_path / "out"
    code, stderr = run_cli("convert", model, "-o", out, "--tp", "2", "--quiet")
    assert code == 0, stderr
    assert sorted(json.loads((out / "manifest.json").read_text())["dropped"]) == dropped
    args = ["verify", out, "--source", model, "--prompt-ids", "5,17,3", "--prompt-ids", "7,8"]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--max-new-tokens", "4"]])
    assert result.exit_code == 0, result.output
    assert "generate  PASS" in result.output and "unexpected" not in result.output
    assert "the source model itself gives NaN/inf logits in 4 rows" in result.output


def _row(tokens, logits):
    return PromptResult(0, [1, 2], tokens, torch.tensor(logits, dtype=torch.float32))


def test_nan_logits_from_a_nan_source_compare_as_nan():
    tol = Tolerance(atol=1e-4, rtol=1e-5, kl=1e-6)
    nan = float("nan")
    ref = _row([0, 0], [[nan, nan, nan], [nan, 1.0, 2.0]])
    same = compare_prompt(ref, _row([0, 0], [[nan, nan, nan], [nan, 1.0, 2.0]]), tol)
    assert same.passed and same.max_abs == 0.0 and same.kl == 0.0
    assert same.source_nonfinite == 2
    # NaN where the reference has a number, or a number where it has NaN, is a mismatch.
    off = compare_prompt(ref, _row([0, 0], [[nan, nan, nan], [0.0, 1.0, 2.0]]), tol)
    assert not off.passed and off.max_abs == float("inf")
    clean = _row([2], [[0.0, 1.0, 2.0]])
    assert compare_prompt(clean, _row([2], [[0.0, 1.0, 2.0 + 1e-3]]), tol).max_abs == pytest.approx(
        1e-3, rel=1e-3
    )
