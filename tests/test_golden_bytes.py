"""Every output byte pinned: fixed checkpoints converted to fixed layouts must give the files,
manifests and reports recorded in tests/golden/outputs.json.

The recording was made before the package was reorganised (issue 11); a refactor that changes
a single output byte fails here. The fixtures are built without transformers and without
torch's random generator (whose kernels differ between CPUs): config.json is a literal dict
and every tensor value is integer arithmetic on its index, so the bytes are the same on any
machine and with any transformers version.

Re-record only for an intended change of output: RESHARD_GOLDEN_WRITE=1 pytest this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from reshard.cli import main
from reshard.models.hparams import parse_hparams
from reshard.models.shapes import synthesize_tensors

GOLDEN = Path(__file__).parent / "golden" / "outputs.json"

DENSE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    torch_dtype="float32",
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# name -> (config.json, [convert arguments per layout])
FIXTURES = {
    "llama": (
        {**DENSE, "architectures": ["LlamaForCausalLM"]},
        [["--tp", "2", "--pp", "2"], ["--tp", "4"], ["--tp", "2", "--dp", "2"]],
    ),
    "mistral_bf16": (
        {**DENSE, "architectures": ["MistralForCausalLM"], "sliding_window": 16,
         "torch_dtype": "bfloat16"},
        [["--tp", "4", "--pp", "2"], ["--pp", "4"]],
    ),
    "qwen2_tied": (
        {**DENSE, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
        [["--tp", "2", "--pp", "2"], ["--tp", "2", "--dtype", "bfloat16"]],
    ),
    "qwen3": (
        {**DENSE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32},
        [["--tp", "2", "--pp", "2"]],
    ),
    "mixtral": (
        {**DENSE, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4,
         "num_experts_per_tok": 2},
        [["--tp", "2", "--ep", "2"], ["--tp", "4", "--ep", "4", "--redundant", "4"]],
    ),
    "qwen2_moe": (
        {**DENSE, **MOE, "architectures": ["Qwen2MoeForCausalLM"],
         "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2},
        [["--tp", "2", "--ep", "2", "--pp", "2"]],
    ),
    "qwen3_moe": (
        {**DENSE, **MOE, "architectures": ["Qwen3MoeForCausalLM"], "mlp_only_layers": [0]},
        [["--tp", "4", "--ep", "2"]],
    ),
    "deepseek_v3": (
        {**DENSE, "architectures": ["DeepseekV3ForCausalLM"], "num_key_value_heads": 4,
         "moe_intermediate_size": 32, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
         "num_experts_per_tok": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
         "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
         "v_head_dim": 12, "num_nextn_predict_layers": 0},
        [["--tp", "2", "--ep", "2", "--pp", "2"], ["--tp", "4", "--ep", "4"]],
    ),
    "llama_fp8_block": (
        {**DENSE, "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16",
         "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                 "activation_scheme": "dynamic", "weight_block_size": [16, 16]}},
        [["--tp", "2", "--pp", "2"]],
    ),
}  # fmt: skip

DTYPE_OF = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _values(name: str, dtype: str, shape) -> torch.Tensor:
    """Deterministic tensor bytes from the name and index alone (exact integer arithmetic,
    one correctly rounded division): identical on every CPU."""
    n = 1
    for d in shape:
        n *= d
    salt = zlib.crc32(name.encode())
    k = torch.arange(n, dtype=torch.int64)
    mixed = (k * 2654435761 + salt) % 65521
    if dtype == "F8_E4M3":  # any byte but the NaNs 0x7f / 0xff
        sign = ((k * 7 + salt) % 2) * 128
        return (mixed % 126 + sign).to(torch.uint8).view(torch.float8_e4m3fn).reshape(shape)
    if dtype == "I32":
        return (mixed - 32760).to(torch.int32).reshape(shape)
    x = mixed.to(torch.float64) / 65521.0 - 0.5
    if name.endswith("scale_inv") or name.endswith("scale"):
        x = x.abs() * 0.01 + 0.001
    return x.to(torch.float32).to(DTYPE_OF[dtype]).reshape(shape)


def write_fixture(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    hp = parse_hparams(config)
    dtype = {"float32": "F32", "bfloat16": "BF16"}[config["torch_dtype"]]
    tensors = {
        name: _values(name, dt, shape)
        for name, (dt, shape) in synthesize_tensors(hp, dtype).items()
    }
    names = sorted(tensors)  # two files, so the index path is exercised
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half]}
    parts["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for file, chosen in parts.items():
        save_file({n: tensors[n].contiguous() for n in chosen}, path / file, {"format": "pt"})
        weight_map.update(dict.fromkeys(chosen, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def _normalise(text: str, *roots: Path) -> str:
    for root in roots:
        text = text.replace(str(root), "<ROOT>")
    return re.sub(r'"manifest_xxh3_128": "[0-9a-f]+"', '"manifest_xxh3_128": "-"', text)


def _digest(text_or_bytes) -> str:
    data = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    return hashlib.sha256(data).hexdigest()[:32]


def _run(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def record_outputs(root: Path) -> dict[str, str]:
    """{label: sha256} for every output file and every --json report of every fixture."""
    out: dict[str, str] = {}
    for name, (config, layouts) in FIXTURES.items():
        src = write_fixture(root / name, config)
        out[f"{name}/inspect"] = _digest(_normalise(_run("inspect", src, "--json"), root))
        for args in layouts:
            label = f"{name}/{'_'.join(a.lstrip('-') for a in args)}"
            plan = _run("plan", src, *args, "--json")
            out[f"{label}/plan"] = _digest(_normalise(plan, root))
            dst = root / "out" / label
            _run("convert", src, "-o", dst, "--quiet", *args)
            for file in sorted(p for p in dst.iterdir() if p.is_file()):
                data = file.read_bytes()
                if file.suffix == ".json":
                    data = _normalise(data.decode(), root).encode()
                out[f"{label}/{file.name}"] = _digest(data)
    first = root / "out" / "llama" / "tp_2_pp_2"
    hf = root / "export"
    _run("export", first, "-o", hf)
    for file in sorted(hf.iterdir()):
        out[f"export/{file.name}"] = _digest(_normalise(file.read_text(errors="replace"), root))
    return out


def test_outputs_match_the_recording(tmp_path):
    got = record_outputs(tmp_path)
    if os.environ.get("RESHARD_GOLDEN_WRITE"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {len(got)} outputs in {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want)
    changed = [label for label in want if got[label] != want[label]]
    assert not changed, f"{len(changed)} of {len(want)} outputs changed: {changed[:8]}"
