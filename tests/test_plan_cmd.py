"""`reshard plan` through the CLI: JSON fields, the per-rank bytes against the bytes convert
actually writes for tiny real checkpoints, config.json alone against safetensors headers,
--suggest, and the error texts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from checkpoints import write_checkpoint
from click.testing import CliRunner
from safetensors import safe_open
from test_memory import MODELS

from reshard.cli import main
from reshard.convert import convert_model
from reshard.layout.recipe import build_recipe

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def cli(*args):
    return CliRunner().invoke(main, ["plan", *map(str, args)])


def plan_json(*args) -> dict:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def config_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MODELS[name]))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": write_checkpoint(root / "llama", shard_size="40KB"),
        "tied": write_checkpoint(root / "tied", tie_word_embeddings=True, num_key_value_heads=1),
        "mixtral": write_checkpoint(root / "mixtral", "MixtralForCausalLM"),
    }


def written_bytes(out: Path) -> dict[int, int]:
    """Bytes of every tensor in each rank's files, read back from what convert wrote."""
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {}
    for entry in manifest["ranks"]:
        total = 0
        for name in entry["files"]:
            with safe_open(out / name, "pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    n = DTYPE_BYTES[part.get_dtype()]
                    for d in part.get_shape():
                        n *= d
                    total += n
        sizes[entry["rank"]] = total
    return sizes


def test_pp4_json_stages_and_rank_sums(tmp_path):
    doc = plan_json(config_dir(tmp_path, "Llama-3-8B"), "--pp", 4, "--dp", 2, "--gpu", "H100")
    stages = doc["stages"]
    assert len(stages) == 4
    assert [s["layers"][0] for s in stages] == [0, *(s["layers"][1] + 1 for s in stages[:-1])]
    assert stages[-1]["layers"][1] == 31
    assert max(s["cost"] for s in stages) == 1.0 and all(0 < s["cost"] <= 1 for s in stages)
    assert sum(s["weight_bytes"] for s in stages) == doc["weight_bytes_total"]
    replica0 = [r for r in doc["ranks"] if r["dp_index"] == 0]
    assert len(doc["ranks"]) == 8 and len(replica0) == 4
    assert sum(r["weight_bytes"] for r in replica0) == doc["weight_bytes_total"]
    budget = doc["gpu"]["budget_bytes"]
    assert budget == round(round(79.22 * 2**30) * 0.9)  # total_gpu_memory x 0.9, as vLLM
    for r in doc["ranks"]:
        fixed = r["weight_bytes"] + r["non_torch_bytes"] + r["activation_bytes"]
        assert r["total_bytes"] == fixed + r["kv_bytes"]
        assert r["kv_cache_bytes"] == budget - fixed
        assert r["headroom_bytes"] == budget - r["total_bytes"]
        first, last = r["layers"]
        per_token = (last - first + 1) * 8 * 128 * 2 * 2  # kv heads x head_dim x K,V x bf16
        assert r["kv_cache_tokens"] == 16 * (r["kv_cache_bytes"] // (16 * per_token))
    # the sampler runs only on the last stage's ranks
    assert [r["activation_bytes"] > 5 * 10**9 for r in replica0] == [False] * 3 + [True]
    assert doc["kv_cache_tokens"] == min(r["kv_cache_tokens"] for r in doc["ranks"])
    blocks = doc["kv_cache_tokens"] // 16
    assert doc["kv_cache_blocks"] == blocks and doc["max_concurrency"] == blocks / (8192 // 16)
    assert doc["engine"] == {
        "max_num_batched_tokens": 8192,  # vllm serve's defaults on an H100
        "max_num_seqs": 1024,
        "block_size": 16,
        "non_torch_bytes": 2**30,
    }
    assert doc["fits"] is True and doc["gpu"]["name"] == "H100"
    assert (doc["context"], doc["batch"]) == (8192, 1)  # max_position_embeddings
    assert doc["stage_report"]["knob"].startswith("VLLM_PP_LAYER_PARTITION=")


def test_kv_per_token_through_the_cli(tmp_path):
    folder = config_dir(tmp_path, "Llama-3-8B")
    one = plan_json(folder, "--context", 16)  # one whole block of 16 tokens
    assert one["kv_bytes_per_token"] == 131072 and one["ranks"][0]["kv_bytes"] == 16 * 131072
    tp8 = plan_json(folder, "--tp", 8, "--context", 1)  # 1 token still takes a block
    assert {r["kv_bytes"] for r in tp8["ranks"]} == {16 * 16384}
    batch = plan_json(folder, "--tp", 8, "--context", 1000, "--batch", 3)
    assert batch["ranks"][0]["kv_bytes"] == 16384 * 3 * 1008


def test_pp4_text(tmp_path):
    result = cli(config_dir(tmp_path, "Llama-3-8B"), "--pp", 4, "--gpu", "H100")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "weights   16.06 GB written in all" in out  # the seed's exact figure
    assert "budget 76.56 GB = --gpu-memory-utilization 0.9 x 85.06 GB" in out
    assert "deployable: KV cache 1,918,320 tokens (119,895 blocks of 16), maximum " in out
    assert "concurrency 234.17x at 8,192 tokens a request" in out
    assert "analytic roofline (decode, batch 1, H100)" in out
    assert "VLLM_PP_LAYER_PARTITION=" in out and "efficiency" in out
    bars = [
        line for line in out.splitlines() if line.startswith("stage ") and "cost \u2588" in line
    ]
    assert len(bars) == 4 and all(" mem \u2588" in b for b in bars)


def test_does_not_fit_names_the_worst_rank(tmp_path):
    result = cli(config_dir(tmp_path, "Llama-3-70B"), "--gpu", "H100", "--context", 8192)
    assert result.exit_code == 0, result.output
    assert (
        "not deployable (1 of 1 ranks short): rank 0 (stage 0): weights 141.11 GB + non-torch "
        "1.07 GB + activation peak 5.52 GB = 147.70 GB of the 76.56 GB budget, no memory left "
        "for the KV cache."
    ) in result.output
    assert "--suggest" in result.output


def test_utilization_flag_sets_the_budget(tmp_path):
    folder = config_dir(tmp_path, "Llama-3-8B")
    doc = plan_json(folder, "--gpu-memory", 40, "--gpu-memory-utilization", 0.5)
    assert doc["gpu"]["gpu_memory_utilization"] == 0.5 and doc["gpu"]["budget_bytes"] == 20 * 10**9
    # 40 GB is under 70 GiB: vllm serve's small-GPU defaults
    assert (doc["engine"]["max_num_batched_tokens"], doc["engine"]["max_num_seqs"]) == (2048, 256)
    result = cli(folder, "--gpu", "H100", "--gpu-memory-utilization", 1.2)
    assert result.exit_code == 2
    error = "error: --gpu-memory-utilization 1.2: give the share of the GPU's memory"
    assert error in result.output


def test_engine_flags_change_the_activation_peak(tmp_path):
    folder = config_dir(tmp_path, "Llama-3-8B")
    small = plan_json(folder, "--gpu", "H100", "--max-num-seqs", 1, "--max-num-batched-tokens", 16)
    large = plan_json(folder, "--gpu", "H100", "--max-num-seqs", 512)
    assert small["ranks"][0]["activation_bytes"] < large["ranks"][0]["activation_bytes"]
    assert small["ranks"][0]["activation_bytes"] == 1 * 128256 * (2 + 40)  # one sampled row
    assert small["kv_cache_tokens"] > large["kv_cache_tokens"]


def test_roofline_follows_the_gpu(tmp_path):
    folder = config_dir(tmp_path, "Llama-3-8B")
    for gpu in ("L40S", "A100"):
        result = cli(folder, "--pp", 2, "--gpu", gpu)
        assert f"analytic roofline (decode, batch 1, {gpu})" in result.output
        assert "H100" not in result.output
    doc = plan_json(folder, "--pp", 2, "--gpu-memory", 40)
    assert doc["cost_source"].startswith("analytic roofline (decode, batch 1, H100)")


@pytest.mark.parametrize(
    "name,flags",
    [
        ("llama", {"tp": 2, "pp": 2}),  # 101-row vocab padded to 102; several source files
        ("tied", {"tp": 2, "pp": 3}),  # last stage writes its own lm_head; kv 1 < tp 2
        ("mixtral", {"tp": 2, "ep": 2}),
    ],
)
def test_plan_bytes_equal_convert_bytes(tiny, tmp_path, name, flags):
    args = [x for k, v in flags.items() for x in (f"--{k}", v)]
    doc = plan_json(tiny[name], *args)
    result = convert_model(str(tiny[name]), tmp_path / "out", build_recipe(**flags))
    written = written_bytes(result.out_dir)
    assert {r["rank"]: r["weight_bytes"] for r in doc["ranks"]} == written
    assert doc["weight_bytes_total"] == sum(written.values())
    assert doc["shapes_from"].startswith("safetensors headers")


@pytest.mark.parametrize("name", ["llama", "tied", "mixtral"])
def test_config_alone_equals_headers(tiny, tmp_path, name):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tiny[name] / "config.json", alone / "config.json")
    flags = ("--tp", 2, "--pp", 2)
    headers = plan_json(tiny[name], *flags)
    for path in (alone, alone / "config.json"):
        synth = plan_json(path, *flags)
        assert synth["shapes_from"].startswith("config.json alone")
        assert synth["ranks"] == headers["ranks"]


def test_expert_placement_report(tiny, tmp_path):
    load = tmp_path / "expert_load.json"
    layers = {str(i): [40, 1, 9, 30] for i in range(3)}
    doc = {"format": "reshard-expert-load", "version": 1, "num_experts": 4, "layers": layers}
    load.write_text(json.dumps(doc))
    result = cli(tiny["mixtral"], "--tp", 2, "--ep", 2, "--expert-load", load, "--redundant", 2)
    assert result.exit_code == 0, result.output
    assert "expert placement: E=4, ep=2, 3 MoE layers" in result.output
    assert "balanced R=2" in result.output


def test_suggest_70b_on_h100(tmp_path):
    folder = config_dir(tmp_path, "Llama-3-70B")
    args = (folder, "--suggest", "--gpu", "H100", "--context", 8192)
    doc = plan_json(*args)
    assert doc["fits"] is True and doc["context"] == 8192
    choice = doc["choice"]
    assert choice["headroom_bytes"] >= 0 and choice["tp"] * choice["pp"] == choice["world"]
    assert choice["tp"] > 1
    tp1 = [r for r in doc["rejected"] if r["tp"] == [1]]
    assert tp1 and tp1[0]["pp"] == [1, 1]
    assert {1} not in [{c["tp"]} for c in doc["candidates"] if c["pp"] == 1]
    text = cli(*args).output
    assert f"choice    tp {choice['tp']} x pp {choice['pp']}" in text
    assert "tp 1 x pp 1: 141.11 GB of weights + 2.68 GB of KV cache on one GPU" in text
    assert "tp 3: heads 64 not divisible" in text


def test_suggest_nothing_fits_exits_2(tmp_path):
    folder = config_dir(tmp_path, "Llama-3-70B")
    result = cli(folder, "--suggest", "--gpu", "L4", "--context", 5_000_000, "--gpus-per-node", 1)
    assert result.exit_code == 2
    assert "choice    none" in result.output


def test_bad_gpu_name_lists_the_known_ones(tmp_path):
    result = cli(config_dir(tmp_path, "Llama-3-8B"), "--gpu", "H800")
    assert result.exit_code == 2
    assert "error: --gpu H800: unknown GPU. Known: B200 (192 GB)" in result.output
    assert "H100 (80 GB)" in result.output and "--gpu-memory GB" in result.output


def test_suggest_without_gpu(tmp_path):
    result = cli(config_dir(tmp_path, "Llama-3-8B"), "--suggest")
    assert result.exit_code == 2
    assert "error: --suggest needs a GPU to fit: pass --gpu NAME" in result.output


def test_flags_that_would_do_nothing(tmp_path):
    folder = config_dir(tmp_path, "Llama-3-8B")
    result = cli(folder, "--suggest", "--gpu", "H100", "--tp", 2)
    assert result.exit_code == 2 and "--tp would do nothing with --suggest" in result.output
    result = cli(folder, "--gpus-per-node", 4)
    assert result.exit_code == 2 and (
        "error: flags: gpus_per_node=4 keeps expert groups (config.json n_group) on nodes, but "
        "LlamaForCausalLM has no expert groups; drop --gpus-per-node" in result.output
    )
    result = cli(folder, "--gpu", "H100", "--gpu-memory", 80)
    assert result.exit_code == 2 and "give one" in result.output


def test_missing_model(tmp_path):
    result = cli(tmp_path / "nothing-here")
    assert result.exit_code == 2 and "not a hub repo id" in result.output


def test_hub_id_fetches_only_config(tmp_path, monkeypatch):
    import huggingface_hub

    folder = config_dir(tmp_path, "Llama-3-8B")
    calls = []

    def fake_download(repo_id, filename, *, revision=None):
        calls.append((repo_id, filename, revision))
        return str(folder / "config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    doc = plan_json("meta-llama/Meta-Llama-3-8B@main", "--tp", 2)
    assert calls == [("meta-llama/Meta-Llama-3-8B", "config.json", "main")]
    assert doc["shapes_from"].startswith("config.json alone")


def test_dtype_flag_casts_the_plan(tmp_path):
    folder = config_dir(tmp_path, "Llama-3-8B")
    bf16, fp32 = (
        plan_json(folder, "--context", 1),
        plan_json(folder, "--context", 1, "--dtype", "fp32"),
    )
    assert fp32["weight_bytes_total"] == 2 * bf16["weight_bytes_total"]
    assert fp32["kv_bytes_per_token"] == 2 * 131072
