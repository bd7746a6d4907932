"""Issue 25, class 5: rank markers (`reshard-rank-NNNNN.json`, written by `convert --ranks`
runs) are input. A damaged marker is no marker (that rank is written again, never a
traceback); what a well-formed marker claims (each tensor's hash) is checked against its file
before the manifest is written, and a lie is exit 2 naming the marker, the tensor and the
fix, with no manifest and nothing of the other ranks changed.
"""

from __future__ import annotations

import json
import shutil

import pytest
import xxhash
from checkpoints import write_checkpoint
from hostile import cli, digest_tree, expect_error

from reshard.headers import read_header
from reshard.verify.levels import verify_output

MANIFEST = "manifest.json"
MARKER0 = "reshard-rank-00000.json"
RANK0 = "rank-00000.safetensors"


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A tp 2 output with rank 0 written (its marker) and rank 1 not."""
    root = tmp_path_factory.mktemp("markers")
    src = write_checkpoint(root / "src")
    o = root / "half"
    result = cli("convert", src, "--tp", "2", "--ranks", "0", "-o", o, "--quiet")
    assert result.exit_code == 0, result.output
    assert (o / MARKER0).is_file() and not (o / MANIFEST).exists()
    return src, o


@pytest.fixture
def o(half, tmp_path):
    copy = tmp_path / "o"
    shutil.copytree(half[1], copy)
    return copy


def finish(src, o, *extra):
    return cli("convert", src, "--tp", "2", "-o", o, "--quiet", *extra)


def marker(o) -> dict:
    return json.loads((o / MARKER0).read_text())


def save(o, doc) -> None:
    (o / MARKER0).write_text(json.dumps(doc))


# --- a lying marker ---------------------------------------------------------------------------


def _first_tensor(doc) -> tuple[str, dict]:
    entry = doc["files"][RANK0]
    return sorted(entry["tensors"])[0], entry


def lie_in_marker(o) -> str:
    doc = marker(o)
    name, entry = _first_tensor(doc)
    entry["tensors"][name] = "0" * 32
    save(o, doc)
    return name


def flip_data_byte(o) -> str:
    """The file changes under a well-formed marker (size and header stay): its claim lies."""
    doc = marker(o)
    name, _ = _first_tensor(doc)
    info = read_header(o / RANK0).tensors[name]
    data = bytearray((o / RANK0).read_bytes())
    data[info.begin] ^= 0x40
    (o / RANK0).write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("lie", [lie_in_marker, flip_data_byte])
def test_a_marker_whose_hashes_lie_stops_the_manifest(half, o, lie):
    tensor = lie(o)
    rank0 = {n: h for n, h in digest_tree(o).items() if n in (RANK0, MARKER0)}
    message = expect_error(
        finish(half[0], o, "--ranks", "1"),
        2,
        f"{o / MARKER0}: claims tensor '{tensor}' of {o / RANK0}",
        "no manifest was written",
        f"Delete {MARKER0} and run reshard convert --resume",
    )
    assert "the file gives" in message
    assert not (o / MANIFEST).exists()
    assert {n: h for n, h in digest_tree(o).items() if n in (RANK0, MARKER0)} == rank0
    (o / MARKER0).unlink()  # the fix the message gives
    assert finish(half[0], o, "--resume").exit_code == 0
    _, results = verify_output(o, levels=("hashes",))
    assert all(r.passed for r in results)


# --- damaged markers: no traceback, the rank is written again --------------------------------


def _set(*path, value):
    def edit(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return doc

    return edit


def _tensor_hash(value):
    def edit(doc):
        name, entry = _first_tensor(doc)
        entry["tensors"][name] = value
        return doc

    return edit


def _drop_tensor(doc):
    name, entry = _first_tensor(doc)
    del entry["tensors"][name]
    return doc


def _extra_file(doc):
    doc["files"]["rank-00001.safetensors"] = doc["files"][RANK0]
    return doc


DAMAGE = {
    "empty file": b"",
    "null": b"null",
    "a list": b"[]",
    "not JSON": b"{",
    "not UTF-8": b'{"format": "\xff"}',
    "deep": b"[" * 5000 + b"]" * 5000,
    "a 5000-digit rank": None,
    "format only": {"format": "reshard-rank-marker"},
    "files a list": _set("files", value=[]),
    "file entry a string": _set("files", RANK0, value="x"),
    "size a string": _set("files", RANK0, "size", value="1"),
    "size a bool": _set("files", RANK0, "size", value=True),
    "tensors missing": _set("files", RANK0, "tensors", value=None),
    "tensors a list": _set("files", RANK0, "tensors", value=[]),
    "hash an int": _tensor_hash(7),
    "hash not hex": _tensor_hash("z" * 32),
    "a tensor missing": _drop_tensor,
    "another rank's file": _extra_file,
    "rank a string": _set("rank", value="0"),
    "rank a bool": _set("rank", value=False),
    "header hash null": _set("files", RANK0, "header_xxh3_128", value=None),
}


def _damage(o, how) -> None:
    if how is None:
        text = json.dumps(marker(o)).replace('"rank": 0', '"rank": ' + "9" * 5000)
        (o / MARKER0).write_text(text)
    elif isinstance(how, bytes):
        (o / MARKER0).write_bytes(how)
    elif isinstance(how, dict):
        save(o, how)
    else:
        save(o, how(marker(o)))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_marker_is_no_marker(half, o, case):
    _damage(o, DAMAGE[case])
    result = finish(half[0], o, "--ranks", "1")
    assert result.exit_code == 0 and result.exception is None, (result.output, result.exception)
    assert "manifest: not yet: ranks 0 are still to be written" in result.output
    assert not (o / MANIFEST).exists()
    result = finish(half[0], o, "--resume")  # writes rank 0 again, then the manifest
    assert result.exit_code == 0, result.output
    _, results = verify_output(o, levels=("hashes",))
    assert all(r.passed for r in results), [r.failures for r in results]
    assert xxhash.xxh3_128((o / RANK0).read_bytes()).hexdigest()  # rank 0 is there again
