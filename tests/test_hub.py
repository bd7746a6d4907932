"""Hub repo ids, fully offline: a real Hugging Face cache layout built in a temp dir
(`models--org--name/{blobs,snapshots,refs}`), HF_HUB_OFFLINE=1, and reshard resolving
`org/name[@revision]` through huggingface_hub's own snapshot_download.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into module constants at import time,
so in-process tests patch those constants as well as the environment; one test runs the CLI
in a fresh process with only the environment set, as a user would.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from checkpoints import write_checkpoint
from click.testing import CliRunner
from huggingface_hub import constants

from reshard.cli import main
from reshard.io.source import open_source

REPO = "org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def add_snapshot(cache: Path, repo: str, commit: str, files: dict[str, bytes], *, ref=None):
    """Lay files out exactly as huggingface_hub does: content-addressed blobs, a snapshot
    folder of relative symlinks into them, and refs/<ref> holding the commit (no newline)."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return repo_dir


def write_tree_listing(repo_dir: Path, commit: str, files: dict[str, bytes]) -> None:
    """The per-commit file listing newer huggingface_hub caches next to the snapshots; offline,
    it checks the snapshot holds every listed file that matches allow_patterns."""
    listing = {
        name: {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
        for name, data in files.items()
    }
    (repo_dir / "trees").mkdir(exist_ok=True)
    doc = {"format_version": 1, "files": listing}
    (repo_dir / "trees" / f"{commit}.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory) -> dict[str, bytes]:
    folder = write_checkpoint(tmp_path_factory.mktemp("hub-src") / "llama", shard_size="200KB")
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert "model.safetensors.index.json" in files  # several shards through the index
    return files


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, checkpoint_files) -> Path:
    """An offline HF cache holding REPO at COMMIT (refs/main) and at OTHER_COMMIT. The repo
    also has a pickle copy of the weights that was never downloaded: only its blob is there,
    and the tree listing names it; reshard must not need it."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    repo_dir = add_snapshot(cache, REPO, COMMIT, checkpoint_files, ref="main")
    add_snapshot(cache, REPO, OTHER_COMMIT, checkpoint_files)
    pickle = b"not a real pickle: must never be read"
    (repo_dir / "blobs" / hashlib.sha256(pickle).hexdigest()).write_bytes(pickle)
    write_tree_listing(repo_dir, COMMIT, {**checkpoint_files, "pytorch_model.bin": pickle})
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def download_calls(monkeypatch) -> list[dict]:
    """Records what reshard asks snapshot_download for, and still runs the real thing."""
    calls: list[dict] = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return calls


def convert(model: str, out: Path):
    return CliRunner().invoke(main, ["convert", model, "-o", str(out), "--tp", "2", "--quiet"])


def test_repo_id_converts_and_records_the_commit(hub_cache, download_calls, tmp_path):
    out = tmp_path / "out"
    result = convert(REPO, out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["source"]
    assert source["model"] == REPO
    assert source["repo_id"] == REPO
    assert source["revision"] == COMMIT
    assert Path(source["path"]).name == COMMIT
    assert (out / "config.json").is_file()  # side files come through the symlinks
    verify = CliRunner().invoke(
        main, ["verify", str(out), "--level", "hashes", "--level", "weights"]
    )
    assert verify.exit_code == 0, verify.output
    assert "weights   PASS" in verify.output


def test_only_what_is_needed_is_requested(hub_cache, download_calls, tmp_path):
    """First config, tokenizer and index; then, pinned to the commit that resolved to, exactly
    the shards the index names."""
    open_source(REPO)
    first, second = download_calls
    assert first["repo_id"] == second["repo_id"] == REPO
    assert second["revision"] == COMMIT
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not any(fnmatch.fnmatch(s, p) for s in shards for p in first["allow_patterns"])
    patterns = second["allow_patterns"]
    for needed in ("config.json", "tokenizer.json", "model.safetensors.index.json", *shards):
        assert any(fnmatch.fnmatch(needed, p) for p in patterns), (needed, patterns)
    for unwanted in (
        "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt",
        "consolidated.safetensors", "model.safetensors", "original/model.safetensors",
    ):  # fmt: skip
        assert not any(fnmatch.fnmatch(unwanted, p) for p in patterns), (unwanted, patterns)


def test_consolidated_weights_beside_the_shards_are_not_fetched(tmp_path, monkeypatch):
    """A Mistral-style repo: the tree lists consolidated.safetensors (never downloaded) beside
    the HF shards. Offline, huggingface_hub refuses a snapshot that lacks a listed file the
    patterns match, so this resolves only if reshard does not ask for it."""
    folder = write_checkpoint(tmp_path / "src", "MistralForCausalLM", shard_size="200KB")
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    cache = tmp_path / "hf-home" / "hub"
    repo_dir = add_snapshot(cache, "mistralai/tiny", COMMIT, files, ref="main")
    write_tree_listing(repo_dir, COMMIT, {**files, "consolidated.safetensors": b"x" * 64})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = open_source("mistralai/tiny")
    assert source.revision == COMMIT
    assert sorted(h.path.name for h in source.headers) == sorted(
        n for n in files if n.startswith("model-")
    )


def test_single_file_repo_fetches_model_safetensors(hub_cache, download_calls, tmp_path):
    files = {p.name: p.read_bytes() for p in write_checkpoint(tmp_path / "one").iterdir()}
    add_snapshot(hub_cache, "org/single", COMMIT, files, ref="main")
    open_source("org/single")
    assert [c["allow_patterns"][-1] for c in download_calls] == [
        "model.safetensors.index.json",
        "model.safetensors",
    ]


def test_pinned_commit(hub_cache, tmp_path):
    out = tmp_path / "out"
    result = convert(f"{REPO}@{OTHER_COMMIT}", out)
    assert result.exit_code == 0, result.output
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert (source["repo_id"], source["revision"]) == (REPO, OTHER_COMMIT)
    assert source["model"] == f"{REPO}@{OTHER_COMMIT}"


def test_revision_flag_is_the_same_as_at_rev(hub_cache, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["convert", REPO, "--revision", OTHER_COMMIT, "-o", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert (source["model"], source["revision"]) == (f"{REPO}@{OTHER_COMMIT}", OTHER_COMMIT)
    both = CliRunner().invoke(main, ["inspect", f"{REPO}@main", "--revision", OTHER_COMMIT])
    assert both.exit_code == 2
    assert both.output == (
        f"error: {REPO}@main: gives a revision and so does --revision {OTHER_COMMIT}; use one.\n"
    )
    local = CliRunner().invoke(main, ["inspect", str(tmp_path), "--revision", "main"])
    assert local.exit_code == 2 and "--revision main is for hub repo ids" in local.output


def test_branch_resolves_to_its_commit(hub_cache):
    source = open_source(f"{REPO}@main")
    assert (source.repo_id, source.revision) == (REPO, COMMIT)


def test_repo_not_in_cache_exits_3(hub_cache, tmp_path):
    out = tmp_path / "out"
    result = convert("org/not-downloaded", out)
    assert result.exit_code == 3, result.output
    assert "org/not-downloaded" in result.stderr
    assert "Download it first, or unset HF_HUB_OFFLINE" in result.stderr
    assert not out.exists()


def test_revision_not_in_cache_exits_3(hub_cache, tmp_path):
    result = convert(f"{REPO}@v2.0", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert f"{REPO}@v2.0" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_partly_downloaded_snapshot_fails_without_output(hub_cache, tmp_path):
    snapshot = hub_cache / "models--org--tiny-llama" / "snapshots" / COMMIT
    (snapshot / "model-00002-of-00003.safetensors").unlink()  # an interrupted download
    out = tmp_path / "out"
    result = convert(REPO, out)
    # exit 3 where huggingface_hub knows the repo's file list (it refuses the snapshot), exit 2
    # where it hands the snapshot over and reshard's index check finds the shard missing.
    assert result.exit_code in (2, 3), result.output
    assert "Download" in result.stderr
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("model", ["not a repo id", "./nope", "../nope/x", "org/-x"])
def test_bad_repo_id_is_bad_input(hub_cache, tmp_path, model):
    result = CliRunner().invoke(main, ["inspect", model])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: {model}: no such folder, and not a hub repo id of the form org/name[@revision].\n"
    )


def test_cli_in_a_fresh_process_honours_the_environment(hub_cache, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=os.environ["HF_HOME"], HF_HUB_OFFLINE="1")  # HF_HUB_CACHE from HF_HOME
    cmd = [sys.executable, "-c", "from reshard.cli import main; main()"]
    run = subprocess.run(
        [*cmd, "convert", REPO, "-o", str(out), "--quiet"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "manifest.json").read_text())["source"]["revision"] == COMMIT
    missing = subprocess.run(
        [*cmd, "convert", "org/absent", "-o", str(tmp_path / "x"), "--quiet"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 3, missing.stderr
    assert "unset HF_HUB_OFFLINE" in missing.stderr
