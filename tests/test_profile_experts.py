"""`reshard profile experts` on tiny MoE checkpoints: the load file it writes, its counts
(tokens x top_k per layer, calibration and held-out counted apart), the file feeding
`reshard convert --expert-load`, and the refusals (dense model, bad prompt ids)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from checkpoints import write_checkpoint  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.errors import InputError  # noqa: E402
from reshard.layout.experts.place import place_model  # noqa: E402
from reshard.layout.experts.report import read_expert_load, report_placement  # noqa: E402
from reshard.profile.experts import (  # noqa: E402
    heldout_verdict,
    profile_experts,
    routed_tokens,
    split_heldout,
)

# Distinct prompts of different lengths; with --heldout 0.25 prompts 3 and 7 are held out.
PROMPTS = [
    [5, 17, 30, 88, 42, 9],
    [1, 2, 3],
    [64, 8, 19, 27, 50, 4, 33, 2, 71],
    [99, 98],
    [11, 12, 13, 14, 15, 16, 17],
    [40, 41, 42, 43],
    [70, 3],
    [20, 21, 22, 23, 24, 25, 26, 27, 28],
]
HELD = [3, 7]
NEW_TOKENS = 4


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def id_flags(prompts):
    return [x for p in prompts for x in ("--prompt-ids", ",".join(map(str, p)))]


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    """8 experts, top-2, a shared expert; a large init scale so the router spreads tokens."""
    path = tmp_path_factory.mktemp("qwen2-moe")
    return write_checkpoint(path, "Qwen2MoeForCausalLM", num_experts=8, initializer_range=0.5)


def test_load_file_counts_every_routed_token(qwen2_moe, tmp_path):
    out = tmp_path / "expert_load.json"
    result = cli(
        "profile", "experts", qwen2_moe, *id_flags(PROMPTS), "--heldout", 0.25,
        "--max-new-tokens", NEW_TOKENS, "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    load = read_expert_load(out)
    assert (load.model, load.num_experts) == (str(qwen2_moe), 8)
    assert (load.prompts, load.heldout_prompts) == (6, 2)
    assert sorted(load.layers) == sorted(load.heldout) == [0, 1, 2]
    calib = [p for i, p in enumerate(PROMPTS) if i not in HELD]
    held = [PROMPTS[i] for i in HELD]
    for layer in load.layers:  # top-2: every token visits two experts; padding never counts
        assert sum(load.layers[layer]) == routed_tokens(calib, NEW_TOKENS) * 2
        assert sum(load.heldout[layer]) == routed_tokens(held, NEW_TOKENS) * 2
        assert sum(c > 0 for c in load.layers[layer]) >= 6  # the router spreads tokens
    assert "8 experts, top-2" in result.output
    assert "expert placement: E=8, ep=4, 3 MoE layers" in result.output
    assert "contiguous R=0" in result.output and "balanced R=0" in result.output
    assert "held-out balancedness (sum)" in result.output


def test_heldout_prompts_are_counted_apart(qwen2_moe):
    """Profiling each part alone gives the same counts: no held-out prompt in calibration."""
    both = profile_experts(
        str(qwen2_moe), prompt_ids=id_flags(PROMPTS)[1::2], max_new_tokens=NEW_TOKENS
    )
    calib, held = split_heldout(PROMPTS, 0.25)
    alone = {}
    for name, part in (("calib", calib), ("held", held)):
        ids = [",".join(map(str, p)) for p in part]
        alone[name] = profile_experts(
            str(qwen2_moe), prompt_ids=ids, heldout=0, max_new_tokens=NEW_TOKENS
        ).load
    assert both.load.layers == alone["calib"].layers
    assert both.load.heldout == alone["held"].layers
    assert both.tokens == routed_tokens(calib, NEW_TOKENS)
    assert both.report_ep == 4  # largest of 8/4/2 leaving >= 2 experts per rank


def test_mixtral_counts_and_default_report(tmp_path):
    src = write_checkpoint(tmp_path / "mixtral", "MixtralForCausalLM", initializer_range=0.5)
    profile = profile_experts(str(src), prompt_ids=["5,17,30", "1,2", "64,8,19,27"])
    calib, held = split_heldout([[5, 17, 30], [1, 2], [64, 8, 19, 27]], 0.25)
    assert profile.load.heldout_prompts == len(held) == 1
    for layer, counts in profile.load.layers.items():
        assert sum(counts) == routed_tokens(calib, 8) * 2, layer
    assert profile.report_ep == 2


def test_load_file_feeds_convert_and_verifies(qwen2_moe, tmp_path):
    load_file = tmp_path / "expert_load.json"
    flags = ("--max-new-tokens", NEW_TOKENS, "--ep", 2, "-o", load_file)
    result = cli("profile", "experts", qwen2_moe, *id_flags(PROMPTS), *flags)
    assert result.exit_code == 0, result.output
    assert "ep=2" in result.output
    out = tmp_path / "out"
    result = cli(
        "convert", qwen2_moe, "--tp", 2, "--ep", 2, "--expert-load", load_file, "-o", out,
        "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    experts = json.loads((out / "manifest.json").read_text())["layout"]["experts"]
    assert experts["load"] == str(load_file)
    loads = read_expert_load(load_file).layers
    expected = place_model(loads, 8, [0, 1, 2], 2)
    for layer, placement in expected.items():
        assert experts["layers"][str(layer)]["phy2log"] == list(placement.phy2log)
    result = cli("verify", out, "--level", "hashes", "--level", "weights")
    assert result.exit_code == 0, result.output


def write_word_tokenizer(folder, words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


def test_prompts_file_uses_the_models_tokenizer(qwen2_moe, tmp_path):
    pytest.importorskip("tokenizers")
    model = tmp_path / "model"
    shutil.copytree(qwen2_moe, model)
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat\n\na dog ran far away\nthe end\n")
    result = cli("profile", "experts", model, "--prompts", text, "-o", tmp_path / "a.json")
    assert result.exit_code == 2
    assert "no tokenizer.json" in result.output and "--prompt-ids" in result.output
    write_word_tokenizer(model, "the cat sat a dog ran far away end".split())
    result = cli("profile", "experts", model, "--prompts", text, "-o", tmp_path / "a.json")
    assert result.exit_code == 0, result.output
    load = read_expert_load(tmp_path / "a.json")
    assert (load.prompts, load.heldout_prompts) == (2, 1)  # the blank line is no prompt
    tokens = routed_tokens([[1, 2, 3], [4, 5, 6, 7, 8]], 8)  # "the end" is held out
    assert all(sum(c) == tokens * 2 for c in load.layers.values())


def test_dense_model_exits_2_naming_the_architecture(tmp_path):
    src = write_checkpoint(tmp_path / "llama", "LlamaForCausalLM")
    result = cli("profile", "experts", src, "--prompt-ids", "1,2,3", "-o", tmp_path / "l.json")
    assert result.exit_code == 2
    assert "LlamaForCausalLM is a dense model" in result.output
    assert not (tmp_path / "l.json").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--prompt-ids", "1,x,3"), "expected comma-separated integers"),
        (("--prompt-ids", "1,2", "--prompt-ids", "5,101"), "prompt 1 has token id 101"),
        (("--prompt-ids", ","), "empty prompt"),
        ((), "exactly one of --prompts FILE"),
        (("--prompt-ids", "1,2", "--ep", 3), "not divisible by ep=3"),
        (("--prompt-ids", "1,2", "--heldout", 1), "--heldout 1.0"),
    ],
)
def test_bad_prompts_and_options_exit_2(qwen2_moe, tmp_path, flags, message):
    result = cli("profile", "experts", qwen2_moe, *flags, "-o", tmp_path / "x.json")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "x.json").exists()


def test_heldout_split_is_deterministic_and_never_empties_calibration():
    ps = [[i] for i in range(8)]
    assert split_heldout(ps, 0.25) == ([[0], [1], [2], [4], [5], [6]], [[3], [7]])
    assert split_heldout(ps[:2], 0.25) == ([[0]], [[1]])  # at least one held out
    assert split_heldout(ps[:1], 0.25) == ([[0]], [])  # one prompt: nothing to spare
    assert split_heldout(ps[:3], 0.9) == ([[1]], [[0], [2]])  # calibration keeps one
    assert split_heldout(ps, 0) == (ps, [])
    with pytest.raises(InputError, match="fraction in"):
        split_heldout(ps, -0.1)


def test_heldout_verdict_says_whether_the_load_carries_over():
    skewed = {0: [900, 400, 120, 60, 25, 5, 3, 1]}
    flat = {0: [100, 100, 100, 100, 100, 100, 100, 100]}
    carries = heldout_verdict(report_placement(skewed, skewed, ep=4))
    assert "balanced vs" in carries and "carries over to unseen prompts" in carries
    even_pairs = {0: [1, 99, 50, 50, 99, 1, 30, 70]}  # contiguous ranks (0,1), (2,3)... hold 100
    noise = heldout_verdict(report_placement(skewed, even_pairs, ep=4))
    assert "1.0000 contiguous: the advantage does not carry over" in noise
    assert "no held-out prompts" in heldout_verdict(report_placement(flat, ep=4))
