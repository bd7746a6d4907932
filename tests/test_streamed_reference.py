"""The streamed reference (one layer in memory at a time, teacher-forced on the sharded
tokens) gives the same verdicts as the full reference, and still catches a wrong token."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from checkpoints import write_checkpoint
from click.testing import CliRunner
from tolerances import assert_close_scaled

from reshard.cli import main
from reshard.convert import convert_model
from reshard.layout.recipe import build_recipe
from reshard.runtime.launch import generate_reference
from reshard.runtime.streamed import reference_streamed
from reshard.verify.compare import compare_results, tolerance_for
from reshard.verify.generate import default_prompts

pytestmark = pytest.mark.float_sensitive  # every test compares a streamed reference's floats

CASES = {
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 4}),
    "qwen2-moe": ("Qwen2MoeForCausalLM", {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def source(request, tmp_path_factory):
    arch, kwargs = CASES[request.param]
    return write_checkpoint(tmp_path_factory.mktemp(request.param), arch, shard_size="30KB",
                            **kwargs)  # fmt: skip


def test_streamed_matches_the_full_reference(source):
    prompts = default_prompts(101)
    full = generate_reference(source, prompts, 8, device="cpu")
    streamed = reference_streamed(source, full, device="cpu")
    assert len({t for r in full for t in r.tokens}) > 3  # the fixture's outputs vary
    for a, b in zip(full, streamed, strict=True):
        assert a.tokens == b.tokens
        assert_close_scaled(b.logits, a.logits, what=f"prompt {a.index}")
    comparisons = compare_results(streamed, full, tolerance_for(torch.float32))
    assert all(c.passed and c.first_mismatch is None for c in comparisons)


def test_streamed_catches_a_wrong_token(source):
    prompts = default_prompts(101)
    full = generate_reference(source, prompts, 8, device="cpu")
    bad = list(full)
    tokens = list(bad[2].tokens)
    tokens[3] = (tokens[3] + 1) % 101  # the sharded run "chose" another token at step 3
    logits = bad[2].logits.clone()
    logits[3, tokens[3]] = logits[3].max() + 1.0  # ...and its logits agree with that choice
    bad[2] = dataclasses.replace(bad[2], tokens=tokens, logits=logits)
    streamed = reference_streamed(source, bad, device="cpu")
    comparisons = compare_results(streamed, bad, tolerance_for(torch.float32))
    assert [c.passed for c in comparisons] == [True, True, False, True]
    assert comparisons[2].first_mismatch == 3


@pytest.mark.world
def test_verify_with_streamed_reference_through_the_cli(tmp_path):
    src = write_checkpoint(tmp_path / "src", num_key_value_heads=1)
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    result = CliRunner().invoke(
        main, ["verify", str(out), "--level", "generate", "--reference", "streamed",
               "--max-new-tokens", "6"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "generate  PASS" in result.output and "streamed reference" in result.output
