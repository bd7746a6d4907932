"""Hostile or careless things done to an output folder (issue 10, classes 4-6): a damaged or
edited manifest, a corrupt rank file, two converts racing into one OUT, an OUT that is the
source, files in OUT that are not reshard's. Each case checks the documented exit code, a
one-line message naming the file and the field, and that the source is untouched.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import random
import shutil
import time
from pathlib import Path

import pytest
import xxhash
from checkpoints import write_checkpoint
from click.testing import CliRunner

from reshard.cli import main
from reshard.convert import convert_model
from reshard.errors import ReshardError
from reshard.io.manifest import write_manifest
from reshard.io.seal import SEAL_KEY
from reshard.layout.recipe import build_recipe
from reshard.verify.levels import verify_output

MANIFEST = "manifest.json"
RANK0 = "rank-00000.safetensors"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest_tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): xxhash.xxh3_128(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def expect_error(result, code: int, *needles: str) -> str:
    """Exited `code` through the CLI's error path with one line naming every needle."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, result.output
    message = result.stderr
    assert message.startswith("error: ") and message.count("\n") == 1, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    src = write_checkpoint(tmp_path_factory.mktemp("src") / "model")
    return src, digest_tree(src)


@pytest.fixture(scope="module")
def pristine(source, tmp_path_factory) -> Path:
    """tp 2 x dp 2: ranks 2 and 3 are replicas of 0 and 1."""
    out = tmp_path_factory.mktemp("conv") / "out"
    convert_model(str(source[0]), out, build_recipe(tp=2, dp=2))
    return out


@pytest.fixture
def out(pristine, source, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(pristine, copy)
    yield copy
    assert digest_tree(source[0]) == source[1]  # whatever happened, the source is untouched


def load(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def save(out: Path, doc) -> None:
    (out / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")


def reseal(out: Path, doc: dict) -> None:
    """What a careful forger does: edit, then seal again as convert would."""
    write_manifest(out, {k: v for k, v in doc.items() if k != SEAL_KEY})


# --- a damaged manifest: exit 2 naming the field --------------------------------------------


def _del(key):
    def edit(d):
        del d[key]

    return edit


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value

    return edit


def _drop_files_entry(d):
    del d["files"][RANK0]


def _tensor(d, rank=0):
    return next(iter(d["ranks"][rank]["tensors"].values()))


MANIFEST_CASES = {
    "rank entry dropped": (lambda d: d["ranks"].pop(), "'ranks' has 3 entries"),
    "world size disagrees": (_set(["layout", "world_size"], 8), "'layout.world_size' is 8"),
    "files missing": (_del("files"), "'files' is missing"),
    "ranks missing": (_del("ranks"), "'ranks' is missing"),
    "rank as a string": (_set(["ranks", 1, "rank"], "1"), "'ranks[1].rank' is string '1'"),
    "rank as a bool": (_set(["ranks", 1, "rank"], True), "'ranks[1].rank' is bool True"),
    "files entry dropped": (_drop_files_entry, f"'ranks[0].files[0]' '{RANK0}' is not a file"),
    "file outside OUT": (
        _set(["files", "../x.safetensors"], {"size": 9, "rank": 0, "header_xxh3_128": "0" * 32}),
        "'files['../x.safetensors']' is not a plain",
    ),
    "file of no rank": (
        _set(["files", "rank-9.safetensors"], {"size": 9, "rank": 1, "header_xxh3_128": "0" * 32}),
        "'files['rank-9.safetensors']' is not listed by rank 1",
    ),
    "negative shape": (lambda d: _tensor(d)["shape"].__setitem__(0, -1), ".shape' is [-1"),
    "piece outside the tensor": (
        lambda d: _tensor(d)["pieces"][0]["dest"].__setitem__(0, 10**6),
        ".pieces[0]' block",
    ),
    "unknown dtype": (lambda d: _tensor(d).__setitem__("dtype", "F99"), ".dtype' is 'F99'"),
    "transposed not true": (
        lambda d: _tensor(d).__setitem__("transposed", "yes"),
        ".transposed' is 'yes' for shape [",
    ),
    "tensor in another rank's file": (
        lambda d: _tensor(d).__setitem__("file", "rank-00001.safetensors"),
        ".file' 'rank-00001.safetensors' is not in ranks[0].files",
    ),
    "hparams layers a string": (
        _set(["hparams", "num_layers"], "3"),
        "'hparams.num_layers' is string '3'",
    ),
    "hparams quantization not a scheme": (
        _set(["hparams", "quantization"], {"kind": "int3"}),
        "'hparams' does not describe a model (KeyError",
    ),
    "stage layers": (
        _set(["layout", "stages", 0, "layers"], [0, 1]),
        "'layout.stages' cover layers 0-1, but the model has 3",
    ),
    "stage count": (lambda d: d["layout"]["stages"].append({}), "'layout.stages' has 2 entries"),
    "replica of the wrong rank": (
        _set(["ranks", 2, "replica_of"], 1),
        "'ranks[2].replica_of' is 1, expected 0",
    ),
    "tp_rank disagrees with the rank order": (
        _set(["ranks", 1, "tp_rank"], 0),
        "'ranks[1].tp_rank' is 0, but rank 1 has tp_rank 1",
    ),
    "header hash not hex": (
        _set(["files", RANK0, "header_xxh3_128"], "xyz"),
        f"'files['{RANK0}'].header_xxh3_128' is 'xyz'",
    ),
    "seal missing": (_del(SEAL_KEY), f"'{SEAL_KEY}' is missing"),
    "source files not a list": (_set(["source", "files"], {}), "'source.files' is object"),
    "source tensor entry": (
        lambda d: d["source"]["files"][0]["tensors"][0].__setitem__(1, ["F32"]),
        "'source.files[0].tensors[0]' is [",
    ),
    "old format version": (_set(["format_version"], 1), "'format_version' is 1"),
    "not a manifest": (_set(["format"], "x"), "'format' is 'x'"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_damaged_manifest_exits_2_naming_the_field(out, case):
    edit, needle = MANIFEST_CASES[case]
    doc = load(out)
    edit(doc)
    save(out, doc)
    expect_error(cli("verify", out, "--level", "hashes"), 2, str(out / MANIFEST), needle)


RAW_CASES = {
    "a 0xff byte": (
        lambda raw: raw[:40] + b"\xff" + raw[41:],
        "not UTF-8 (byte 0xff at offset 40)",
    ),
    "truncated": (lambda raw: raw[: len(raw) // 2], "not valid JSON"),
    "a list": (lambda raw: b"[]", "'format' is 'list'"),
    "nested 100000 deep": (lambda raw: b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    "an int of 5000 digits": (
        lambda raw: raw.replace(b'"world_size": 4', b'"world_size": ' + b"9" * 5000),
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("case", RAW_CASES)
def test_unreadable_manifest_exits_2(out, case):
    edit, needle = RAW_CASES[case]
    (out / MANIFEST).write_bytes(edit((out / MANIFEST).read_bytes()))
    expect_error(cli("verify", out), 2, str(out / MANIFEST), needle)


EXPERT_CASES = {
    "phy2log a string": (["phy2log"], "x", ".phy2log' is string 'x', expected array"),
    "expert id out of range": (["phy2log", 0], 7, ".phy2log' is [7,"),
    "log2phy slot missing": (["log2phy", 0], [-1], ".log2phy[0]' is [-1], expected 1 slots"),
    "slots_per_rank zero": (["slots_per_rank"], 0, ".slots_per_rank' is 0, expected >= 1"),
}


@pytest.fixture(scope="module")
def moe_out(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("moe")
    src = write_checkpoint(base / "src", "MixtralForCausalLM", num_hidden_layers=2)
    convert_model(str(src), base / "out", build_recipe(tp=2, ep=2))
    return base / "out"


@pytest.mark.parametrize("case", EXPERT_CASES)
def test_damaged_expert_map_exits_2(moe_out, tmp_path, case):
    path, value, needle = EXPERT_CASES[case]
    out = tmp_path / "out"
    shutil.copytree(moe_out, out)
    doc = load(out)
    _set(["layout", "experts", "layers", "1", *path], value)(doc)
    save(out, doc)
    expect_error(cli("verify", out), 2, str(out / MANIFEST), "layout.experts.layers['1']", needle)


# --- a tampered manifest that still parses: exit 1 -----------------------------------------


def _drop_file_consistently(d):
    """Remove rank-00001's file everywhere, so the schema holds: it would then never be hashed."""
    del d["files"]["rank-00001.safetensors"]
    d["ranks"][1]["files"] = []
    d["ranks"][3]["files"] = []
    d["ranks"][1]["tensors"] = {}


TAMPER_CASES = {
    "config edited": lambda d: d["config"].__setitem__("hidden_size", 65),
    "files entry removed with its rank's": _drop_file_consistently,
    "tensor shape edited": lambda d: _tensor(d, 1)["shape"].__setitem__(0, 10**4),
    "hparams eps edited": lambda d: d["hparams"].__setitem__("rms_norm_eps", 1e-3),
}


@pytest.mark.parametrize("case", TAMPER_CASES)
def test_tampered_manifest_fails_the_seal(out, case):
    doc = load(out)
    TAMPER_CASES[case](doc)
    save(out, doc)
    result = cli("verify", out, "--level", "hashes")
    assert result.exit_code == 1, result.output
    assert f"{out / MANIFEST}: content hash" in result.output
    assert "the manifest was edited or corrupted after convert" in result.output


def test_one_added_space_fails_the_seal(out):
    raw = (out / MANIFEST).read_bytes()
    (out / MANIFEST).write_bytes(raw.replace(b'"tp": 2', b'"tp":  2'))
    result = cli("verify", out, "--level", "hashes")
    assert result.exit_code == 1, result.output
    assert "content hash" in result.output


def test_resealed_shape_edit_is_caught_by_the_rank_file_header(out):
    doc = load(out)
    name, entry = next(iter(doc["ranks"][1]["tensors"].items()))
    entry["shape"][0] += 1  # the pieces still fit: only the rank file's header can tell
    reseal(out, doc)
    for level in ("hashes", "weights"):
        result = cli("verify", out, "--level", level)
        assert result.exit_code == 1, result.output
        assert f"rank-00001.safetensors: tensor '{name}' (rank 1) is F32 [" in result.output
        assert "in the manifest; one of them was altered" in result.output


def test_resealed_unknown_piece_source_fails_weights(out):
    doc = load(out)
    name, entry = next(iter(doc["ranks"][0]["tensors"].items()))
    entry["pieces"][0]["source"] = "model.nothing.weight"
    reseal(out, doc)
    result = cli("verify", out, "--level", "weights")
    assert result.exit_code == 1, result.output
    assert f"ranks[0].tensors['{name}'].pieces[0].source 'model.nothing.weight'" in result.output
    assert "pass the right --source" in result.output


# --- a corrupt rank file ---------------------------------------------------------------------


@pytest.mark.parametrize("level", ["hashes", "weights"])
def test_corrupt_rank_file_header_exits_1_naming_the_file(out, level):
    path = out / RANK0
    raw = bytearray(path.read_bytes())
    raw[8] = ord("[")  # the header JSON is no longer an object
    path.write_bytes(bytes(raw))
    result = cli("verify", out, "--level", level)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert f"{path}: unreadable header" in result.output


# --- convert: whose files are these? ----------------------------------------------------------


@pytest.mark.parametrize("shard", ["model.safetensors", RANK0])
def test_out_equal_to_the_source_is_refused(source, tmp_path, shard):
    """A source shard named like a rank file makes the folder read as an (incomplete) reshard
    output: refused as such, before anything is written."""
    src = tmp_path / "model"
    shutil.copytree(source[0], src)
    (src / "model.safetensors").rename(src / shard)
    before = digest_tree(src)
    needle = f"{src}: is the source folder" if shard != RANK0 else "manifest.json: missing"
    expect_error(cli("convert", src, "-o", src, "--quiet"), 2, str(src), needle)
    assert digest_tree(src) == before


def test_out_inside_the_source_is_refused(source, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(source[0], src)
    before = digest_tree(src)
    o = src / "sub" / "out"
    expect_error(cli("convert", src, "-o", o, "--quiet"), 2, str(o), f"source folder {src}")
    assert digest_tree(src) == before and not (src / "sub").exists()


def test_out_holding_a_source_file_is_refused(source, tmp_path):
    """The source's shard is a symlink into OUT: writing OUT would overwrite what it reads."""
    o = tmp_path / "out"
    o.mkdir()
    shutil.copy(source[0] / "model.safetensors", o / "model.safetensors")
    src = tmp_path / "model"
    shutil.copytree(source[0], src, ignore=shutil.ignore_patterns("model.safetensors"))
    (src / "model.safetensors").symlink_to(o / "model.safetensors")
    expect_error(cli("convert", src, "-o", o, "--quiet"), 2, str(o), "holds source file")


def test_source_in_a_subfolder_of_out_is_fine(source, tmp_path):
    o = tmp_path / "out"
    shutil.copytree(source[0], o / "model")
    result = cli("convert", o / "model", "-o", o, "--tp", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert digest_tree(o / "model") == source[1]


def test_files_that_are_not_reshards_stay(source, tmp_path):
    o = tmp_path / "out"
    o.mkdir()
    mine = {"thesis.partial": b"chapter 1", "rank-00042.safetensors.bak": b"backup"}
    for name, data in mine.items():
        (o / name).write_bytes(data)
    plans = []
    for args in (["--tp", "2"], ["--tp", "2", "--force"], ["--force"]):
        result = cli("convert", source[0], "-o", o, "--quiet", *args)
        assert result.exit_code == 0, result.output
        for name, data in mine.items():
            assert (o / name).read_bytes() == data
        plans.append(json.loads((o / "reshard-record.json").read_text())["plan_xxh3_128"])
    assert plans[0] == plans[1] != plans[2]  # the record's fingerprint follows the layout
    assert sorted(p.name for p in o.glob("rank-*.safetensors")) == [RANK0]  # tp 2 -> 1


def test_force_over_an_output_without_a_record_deletes_only_what_its_manifest_names(out, source):
    """An output of a reshard without records: its manifest says which rank files are its own."""
    (out / "reshard-record.json").unlink()
    (out / "rank-00042.safetensors.bak").write_bytes(b"backup")
    result = cli("convert", source[0], "-o", out, "--quiet", "--force")  # tp 2 x dp 2 -> tp 1
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("rank-*")) == [RANK0, "rank-00042.safetensors.bak"]
    assert (out / "rank-00042.safetensors.bak").read_bytes() == b"backup"
    assert verify_code(out)[0] == 0


def test_a_rank_file_no_record_names_is_not_replaced(source, tmp_path):
    o = tmp_path / "out"
    o.mkdir()
    (o / RANK0).write_bytes(b"someone else's")
    expect_error(
        cli("convert", source[0], "-o", o, "--quiet"),
        2,
        f"{o / RANK0}: exists, and no reshard record in {o} names it",
    )
    assert (o / RANK0).read_bytes() == b"someone else's"
    assert not (o / MANIFEST).exists()


def test_a_record_naming_paths_outside_out_is_refused(source, tmp_path):
    o = tmp_path / "out"
    o.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    record = {"format": "reshard-record", "format_version": 1, "files": ["../victim.txt"]}
    (o / "reshard-record.json").write_text(json.dumps(record))
    expect_error(
        cli("convert", source[0], "-o", o, "--quiet"),
        2,
        f"{o / 'reshard-record.json'}: not a valid reshard-record",
        "field 'files'",
    )
    assert victim.read_text() == "keep me"


def test_a_held_lock_refuses_a_second_convert(source, tmp_path):
    o = tmp_path / "out"
    o.mkdir()
    with open(o / ".reshard.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what a running convert holds
        expect_error(
            cli("convert", source[0], "-o", o, "--quiet"),
            2,
            f"{o}: another reshard convert is writing into this folder",
            "Wait for it to finish, or write elsewhere with -o",
        )
    assert not (o / MANIFEST).exists() and not list(o.glob("rank-*"))
    assert cli("convert", source[0], "-o", o, "--quiet").exit_code == 0  # released


# --- two converts racing into one OUT ---------------------------------------------------------

BUSY = "another reshard convert is writing into this folder"
DONE = "already holds a reshard output"


def _convert_child(args: list[str], log: str) -> None:
    """A child process: `reshard convert ARGS`, its output into `log`, its exit code as ours."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from reshard.cli import main

    main(["convert", *args, "--quiet"])


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from one server that imported reshard (and torch) once: each convert
    then costs a fork, not a 2 s interpreter start-up, so 40 of them race in a few seconds."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["reshard.cli", "reshard.convert"])
    return ctx


def _race(ctx, src: Path, outs: list[Path], delays: list[float]) -> list[tuple]:
    """For each OUT: `convert --tp 2 --pp 2 -o OUT & (sleep delay; convert --tp 4 -o OUT)`,
    every pair at once. Processes are started from this thread only (forkserver's start is
    not thread-safe); returns (exit code of the first, of the second, their output)."""
    layouts = (["--tp", "2", "--pp", "2"], ["--tp", "4"])
    starts = sorted((d * which, i, which) for i, d in enumerate(delays) for which in (0, 1))
    procs: dict[tuple[int, int], object] = {}
    t0 = time.perf_counter()
    for at, i, which in starts:
        time.sleep(max(0.0, at - (time.perf_counter() - t0)))
        args = [str(src), "-o", str(outs[i]), *layouts[which]]
        proc = ctx.Process(target=_convert_child, args=(args, f"{outs[i]}.{which}.log"))
        proc.start()
        procs[i, which] = proc
    for proc in procs.values():
        proc.join()
    return [(procs[i, 0].exitcode, procs[i, 1].exitcode, _logs(outs[i])) for i in range(len(outs))]


def _logs(out: Path) -> str:
    return "".join(Path(f"{out}.{which}.log").read_text() for which in (0, 1))


def test_concurrent_converts_never_leave_mixed_layouts(source, tmp_path, forkserver):
    delays = [0.02 * i for i in range(20)]  # from together to past a whole tiny convert
    outs = [tmp_path / f"o{i}" for i in range(20)]
    runs = []
    for batch in range(0, 20, 5):  # five races at a time
        part = slice(batch, batch + 5)
        runs += _race(forkserver, source[0], outs[part], delays[part])
    outcomes = []
    for i, (code_a, code_b, err) in enumerate(runs):
        assert sorted([code_a, code_b]) == [0, 2], (i, code_a, code_b, err)
        assert BUSY in err or DONE in err, err
        assert "Traceback" not in err
        winner = {"tp": 2, "pp": 2} if code_a == 0 else {"tp": 4, "pp": 1}
        o = tmp_path / f"o{i}"
        doc = load(o)
        assert {k: doc["layout"][k] for k in winner} == winner
        assert sorted(p.name for p in o.glob("rank-*")) == sorted(doc["files"])
        _, results = verify_output(o, levels=("hashes",))
        assert all(r.passed for r in results), [r.failures for r in results]
        outcomes.append(("first" if code_a == 0 else "second") + (" busy" if BUSY in err else ""))
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    print(f"race: 20/20 consistent; winner (and busy refusals): {counts}")


# --- 1,000 seeded random flips ----------------------------------------------------------------


def verify_code(out: Path) -> tuple[int, str]:
    """What `reshard verify OUT --level hashes` exits with, in-process."""
    try:
        _, results = verify_output(out, levels=("hashes",))
    except ReshardError as e:
        return e.exit_code, str(e)
    failures = [f for r in results for f in r.failures]
    return (0 if all(r.passed for r in results) else 1), "\n".join(failures)


def test_1000_random_flips_across_rank_files_and_manifest_are_all_caught(out):
    rng = random.Random(10)
    names = [MANIFEST, *sorted(load(out)["files"])]
    original = {n: (out / n).read_bytes() for n in names}
    assert verify_code(out)[0] == 0
    codes = {1: 0, 2: 0}
    start = time.perf_counter()
    for i in range(1000):
        name = MANIFEST if i % 2 else rng.choice(names[1:])  # half in the manifest
        data = bytearray(original[name])
        pos = rng.randrange(len(data))
        data[pos] ^= rng.randrange(1, 256)
        (out / name).write_bytes(bytes(data))
        code, message = verify_code(out)  # any exception but ReshardError fails the test
        assert code in (1, 2), (name, pos, code)
        assert str(out / name) in message, (name, pos, message)
        codes[code] += 1
        (out / name).write_bytes(original[name])
    seconds = time.perf_counter() - start
    assert verify_code(out)[0] == 0
    sizes = {n: len(b) for n, b in original.items()}
    print(f"flips: 1000/1000 caught (exit 1: {codes[1]}, exit 2: {codes[2]}) in {seconds:.1f} s; "
          f"files {sizes}")  # fmt: skip
