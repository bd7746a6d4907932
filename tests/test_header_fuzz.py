"""Differential fuzzing of the safetensors header validator against safetensors' own reader.

Seeded mutations of valid files (raw byte edits, hostile JSON tokens spliced in, and
structural edits of the parsed header) are read by `reshard.headers.read_header` and by
`safetensors.safe_open` on the same bytes. reshard must never crash (any exception other than
its CheckpointError) and never accept what the reference refuses. Refusing more is allowed
where reshard has its own rules (duplicate or odd names, dtypes it does not know); when both
accept, they must agree on every tensor's name, dtype and shape.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open

from reshard.errors import CheckpointError, ReshardError
from reshard.headers import DTYPE_SIZES, read_header
from reshard.models.hparams import parse_hparams

SEED = 20261202
CASES = 12_000
U64 = 1 << 64

# Tokens a hostile file splices into a header: what Python's json and serde_json disagree on.
HOSTILE_TOKENS = [
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1e308", b"-0", b"-0.0", b"0.0",
    b"1" * 400, b"9" * 309, b"1" * 25, b"18446744073709551616", b"18446744073709551615",
    b"-1", b"4.0", b"4e0", b"true", b"null", b'"\\ud800"', b'"\\udc00\\ud800"',
    b'"\\ud83d\\ude00"', b'"\\u0000"', b'"\xff"', b'"\xed\xa0\x80"', b"[" * 130 + b"]" * 130,
    b"[" * 126 + b"]" * 126, b"{}", b"[]", b'""', b'"F32"', b'"f32"', b'"F4"', b"[0, 0]",
]  # fmt: skip

FIELD_VALUES = [
    0, 1, 3, -1, -0.0, 4.0, 2**63, U64 - 1, U64, 2**32, 10**30, True, None, "F32", "", [], {},
    [0], [U64], [U64 - 1, 0], [2**32, 2**32, 0], [0, 2**32, 2**32], [2**61], [1, 2, 3], "x" * 3,
    {"a": 1}, [[4]], "\ud800",
]  # fmt: skip


def base_headers() -> list[tuple[dict, bytes]]:
    """Valid (header, data) pairs: several dtypes, zero-size tensors, metadata."""
    out = []
    for n_tensors in (1, 3, 6):
        header: dict = {"__metadata__": {"format": "pt"}} if n_tensors != 3 else {}
        cursor = 0
        dtypes = list(DTYPE_SIZES)
        for i in range(n_tensors):
            dtype = dtypes[(i * 5 + n_tensors) % len(dtypes)]
            shape = [[4], [2, 3], [0, 5], [1], [3, 0, 2], [2, 2, 2]][i % 6]
            size = DTYPE_SIZES[dtype]
            for d in shape:
                size *= d
            header[f"model.layers.{i}.w"] = {
                "dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + size],
            }  # fmt: skip
            cursor += size
        out.append((header, bytes(range(256)) * (cursor // 256) + bytes(cursor % 256)))
    return out


def encode(header_bytes: bytes, data: bytes, *, length: int | None = None) -> bytes:
    n = len(header_bytes) if length is None else length
    return struct.pack("<Q", n) + header_bytes + data


def dumps(header: dict) -> bytes:
    # ensure_ascii=False keeps lone surrogates as raw code points: encode them as escapes.
    return json.dumps(header).encode()


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    raw = bytearray(raw)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(6)
        i = rng.randrange(len(raw) + 1)
        if op == 0 and raw:  # flip a byte
            raw[min(i, len(raw) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a byte, often a JSON-significant one
            raw[i:i] = bytes([rng.choice(b'{}[]",:-0123456789eE.\\ \xff\x00')])
        elif op == 2 and raw:  # delete a run
            del raw[i : i + rng.randrange(1, 4)]
        elif op == 3:  # splice a hostile token over a run
            raw[i : i + rng.randrange(0, 6)] = rng.choice(HOSTILE_TOKENS)
        elif op == 4:  # change a digit
            digits = [k for k, b in enumerate(raw) if 48 <= b <= 57]
            if digits:
                raw[rng.choice(digits)] = rng.choice(b"0123456789")
        else:  # replace a number with a hostile token
            starts = [k for k in range(1, len(raw)) if 48 <= raw[k] <= 57 and raw[k - 1] in b"[, "]
            if starts:
                k = rng.choice(starts)
                end = k
                while end < len(raw) and 48 <= raw[end] <= 57:
                    end += 1
                raw[k:end] = rng.choice(HOSTILE_TOKENS)
    return bytes(raw)


def mutate_structure(rng: random.Random, header: dict) -> bytes:
    """Edit the parsed header: field values, missing/extra fields, metadata, nesting."""
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(7)
    name = rng.choice(names)
    entry = header[name]
    if op == 0:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(FIELD_VALUES)
    elif op == 1:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 2:
        entry[rng.choice(["extra", "dtype_", "Shape"])] = rng.choice(FIELD_VALUES)
    elif op == 3:
        header["__metadata__"] = rng.choice(
            [{"k": rng.choice(FIELD_VALUES)}, {rng.choice(["\ud800", "k"]): "v"}, [], "x", None]
        )
    elif op == 4:
        depth = rng.choice([60, 124, 125, 126, 127, 200])
        nest: object = 0
        for _ in range(depth):
            nest = [nest]
        entry["extra"] = nest
    elif op == 5:
        dim = rng.randrange(len(entry["shape"]) + 1)
        entry["shape"].insert(dim, rng.choice([0, 1, 2**32, U64 - 1, U64, 2**62]))
    else:
        header[rng.choice([name + "x", "", " w", "w\n", "\ud800"])] = entry
    return json.dumps(header).encode("utf-8", "surrogatepass")


def make_case(rng: random.Random, bases) -> bytes:
    header, data = rng.choice(bases)
    kind = rng.randrange(10)
    if kind < 5:
        return encode(mutate_bytes(rng, dumps(header)), data)
    if kind < 9:
        return encode(mutate_structure(rng, header), data)
    raw = dumps(header)  # header length or data length off
    if rng.random() < 0.5:
        return encode(raw, data, length=len(raw) + rng.choice([-2, -1, 1, 7, 2**40, 2**63]))
    return encode(raw, data + bytes(rng.choice([1, 8])) if rng.random() < 0.5 else data[:-1])


def read_reference(path: Path) -> dict | None:
    """{name: (dtype, shape)} from safetensors' own reader, or None when it refuses."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                name: (str(f.get_slice(name).get_dtype()), tuple(f.get_slice(name).get_shape()))
                for name in f.keys()
            }
    except Exception:
        return None


def read_reshard(path: Path) -> dict | None | BaseException:
    """{name: (dtype, shape)}, None when refused, the exception itself on a crash."""
    try:
        header = read_header(path)
    except CheckpointError:
        return None
    except Exception as e:  # noqa: BLE001 - a crash is what this test counts
        return e
    return {name: (t.dtype, t.shape) for name, t in header.tensors.items()}


def run_fuzz(tmp: Path, cases: int, seed: int) -> Counter:
    rng = random.Random(seed)
    bases = base_headers()
    tally: Counter = Counter()
    for i in range(cases):
        # A new file per case: truncating one file in place costs ~1 ms per case on ext4.
        path = tmp / f"case-{i}.safetensors"
        path.write_bytes(make_case(rng, bases))
        ours, ref = read_reshard(path), read_reference(path)
        raw = path.read_bytes()
        path.unlink()
        if isinstance(ours, BaseException):
            tally["crash"] += 1
            tally[f"crash example {i}: {type(ours).__name__}: {ours}"[:200]] += 1
        elif ours is not None and ref is None:
            tally["permissive"] += 1
            tally[f"permissive example {i}: {raw[:300]!r}"] += 1
        elif ours is not None and ref is not None:
            tally["both accept"] += 1
            tally["disagree on tensors"] += _disagree(ours, ref)
        else:
            tally["reshard refuses" if ref is None else "only reshard refuses"] += 1
    return tally


def _disagree(ours: dict, ref: dict) -> int:
    if set(ours) != set(ref):
        return 1
    return int(any((ours[n][0], tuple(ours[n][1])) != ref[n] for n in ours))


def test_differential_fuzz_header_validator(tmp_path, capsys):
    start = time.perf_counter()
    tally = run_fuzz(tmp_path, CASES, SEED)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nheader fuzz: {CASES} cases, seed {SEED}, {seconds:.1f} s: {dict(tally)}")
    examples = [k for k in tally if "example" in k][:5]
    assert tally["crash"] == 0, examples
    assert tally["permissive"] == 0, examples
    assert tally["disagree on tensors"] == 0
    # The mutations reach both sides of the boundary: a fuzzer whose every case is refused (or
    # accepted) would prove nothing.
    assert tally["both accept"] > CASES // 20, tally
    assert tally["reshard refuses"] > CASES // 2, tally


def test_fuzzer_counts_a_permissive_validator(tmp_path, monkeypatch):
    """The harness itself can fail: with the strict JSON checks switched off, NaN, 1e999 and
    lone surrogates get through and are counted as permissive."""
    import reshard.headers as sio

    def lenient(raw, path, *, what, fix):
        return json.loads(raw.decode("utf-8", "surrogatepass"))

    monkeypatch.setattr(sio, "load_json", lenient)
    tally = run_fuzz(tmp_path, 2_000, SEED)
    assert tally["permissive"] + tally["crash"] > 0, tally


# --- config.json values: never a crash ------------------------------------------------------

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 101, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 256, "tie_word_embeddings": False, "hidden_act": "silu",
    "torch_dtype": "float32", "sliding_window": None, "head_dim": 16,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}  # fmt: skip

CONFIG_VALUES = [
    None, 0, -1, 1, 2, 7, 3.5, float("nan"), "x", "", True, False, [], [1], ["LlamaForCausalLM"],
    {}, {"rope_type": "yarn"}, {"factor": "x", "rope_type": "linear"}, 10**30, 5,
]  # fmt: skip


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2MoeForCausalLM", "MistralForCausalLM"])
def test_config_values_never_crash(arch):
    rng = random.Random(SEED)
    extra = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": True,
             "layer_types": ["full_attention"] * 3, "max_window_layers": 2}  # fmt: skip
    base = {**CONFIG, **extra, "architectures": [arch]}
    refused = 0
    for _ in range(3_000):
        config = dict(base)
        for _ in range(rng.choice((1, 2))):
            config[rng.choice(sorted(config))] = rng.choice(CONFIG_VALUES)
        try:
            parse_hparams(config, where="config.json")
        except ReshardError as e:
            refused += 1
            assert str(e).startswith("config.json: ") and "\n" not in str(e), str(e)
    assert 0 < refused < 3_000
