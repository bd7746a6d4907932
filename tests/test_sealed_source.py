"""Issue 25, class 3 (and the edited source record of 7): a reshard output read as a source
(re-layout: `convert OUT`, and `export OUT`) is read only through a manifest whose seal
checks out and whose `config` is what its `hparams` were parsed from, before a byte is
written. Each case: exit 2, one `error:` line naming manifest.json, the key and the fix; the
output read is byte-identical afterwards and the new folder was never created.
"""

from __future__ import annotations

import json
import shutil

import pytest
from checkpoints import write_checkpoint
from hostile import cli, digest_tree, expect_error

from reshard.convert import convert_model
from reshard.io.manifest import write_manifest
from reshard.io.seal import SEAL_KEY
from reshard.layout.recipe import build_recipe

MANIFEST = "manifest.json"
Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("seal")
    src = write_checkpoint(root / "src")
    out = root / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    return out


@pytest.fixture
def out(pristine, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy)
    return copy


def swap_sources(doc: dict) -> None:
    """The two layers' q_proj pieces trade their `source`: a map that reads them swapped."""
    for entry in doc["ranks"]:
        for meta in entry["tensors"].values():
            for piece in meta["pieces"]:
                piece["source"] = {Q0: Q1, Q1: Q0}.get(piece["source"], piece["source"])


def edit(out, change, *, reseal: bool) -> None:
    doc = json.loads((out / MANIFEST).read_text())
    change(doc)
    if reseal:  # what a careful forger does
        write_manifest(out, {k: v for k, v in doc.items() if k != SEAL_KEY})
    else:
        (out / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")


def set_config(key, value):
    def change(doc):
        doc["config"][key] = value

    return change


def drop_source_tensor(doc):
    doc["source"]["files"][0]["tensors"] = [
        t for t in doc["source"]["files"][0]["tensors"] if t[0] != Q1
    ]


SEALED = f"'{SEAL_KEY}'"
CASES = {
    # name: (edit, reseal, what the message names)
    "sources swapped": (swap_sources, False, SEALED),
    "config edited": (set_config("rms_norm_eps", 0.5), False, SEALED),
    "config edited, resealed": (
        set_config("rms_norm_eps", 0.5),
        True,
        "field 'config' gives rms_norm_eps = 0.5, but 'hparams.rms_norm_eps' is 1e-06",
    ),
    "config unparsable, resealed": (
        set_config("num_attention_heads", "four"),
        True,
        "num_attention_heads",
    ),
    "source record edited": (drop_source_tensor, False, SEALED),
    "source record edited, resealed": (
        drop_source_tensor,
        True,
        f"pieces come from '{Q1}', which is not in the source record",
    ),
}


@pytest.mark.parametrize("command", ["re-layout", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_map_is_refused_before_a_byte_is_written(out, tmp_path, command, case):
    change, reseal, names = CASES[case]
    edit(out, change, reseal=reseal)
    before = digest_tree(out)
    new = tmp_path / "new"
    if command == "re-layout":
        result = cli("convert", out, "--tp", "1", "-o", new, "--quiet")
    else:
        result = cli("export", out, "-o", new)
    message = expect_error(result, 2, f"{out / MANIFEST}", names)
    assert "re-run reshard convert" in message or "convert from the original" in message
    assert digest_tree(out) == before
    assert not new.exists()


def test_the_intact_map_still_reads(out, tmp_path):
    """The control: the same commands on the untouched output succeed."""
    assert cli("convert", out, "--tp", "1", "-o", tmp_path / "a", "--quiet").exit_code == 0
    assert cli("export", out, "-o", tmp_path / "b").exit_code == 0


@pytest.mark.parametrize("command", ["re-layout", "export"])
def test_an_edited_side_file_is_not_passed_on(out, tmp_path, command):
    """OUT/config.json is copied into the new folder: it must be the one the manifest hashed."""
    config = out / "config.json"
    config.write_text(config.read_text().replace("}", ', "edited": true}', 1))
    before = digest_tree(out)
    new = tmp_path / "new"
    if command == "re-layout":
        result = cli("convert", out, "--tp", "1", "-o", new, "--quiet")
    else:
        result = cli("export", out, "-o", new)
    expect_error(
        result, 2, f"{config}: hash ", "!= manifest side_files['config.json']",
        "restore it or re-run reshard convert",
    )  # fmt: skip
    assert digest_tree(out) == before and not new.exists()
