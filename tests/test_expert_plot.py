"""`plan --plot` and `profile experts --plot`: the PNG opens, has the figure's size and is
not blank; without matplotlib the flag exits 2 with the install command; refusals by text."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from reshard.cli import main

CONFIGS = Path(__file__).parent.parent / "examples" / "configs"
# 32 MoE layers x 8 experts, skewed differently per layer
LOADS = {str(i): [(i * 7 + e * 13) % 50 + 5 * e for e in range(8)] for i in range(32)}


def mixtral_with_load(tmp_path):
    model = tmp_path / "mixtral"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "mixtral-8x7b" / "config.json").read_text())
    held = {k: [x + (e % 3) * 4 for e, x in enumerate(v)] for k, v in LOADS.items()}
    doc = {"format": "reshard-expert-load", "version": 1, "num_experts": 8, "layers": LOADS}
    load = tmp_path / "expert_load.json"
    load.write_text(json.dumps({**doc, "heldout": held}))
    return model, load


def plan(*args):
    return CliRunner().invoke(main, ["plan", *map(str, args)])


def check_png(path: Path) -> None:
    """1400 x 900 pixels (14 x 9 in at 100 dpi), and drawn: many colours, not one flat fill."""
    image = pytest.importorskip("matplotlib.image").imread(path)  # [H, W, 4] floats
    assert image.shape[:2] == (900, 1400)
    pixels = {tuple(px) for row in image[::7] for px in row[::7]}
    assert len(pixels) > 50
    assert float(image[..., :3].std()) > 0.05


def test_plan_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model, load = mixtral_with_load(tmp_path)
    out = tmp_path / "placement.png"
    result = plan(
        model, "--tp", 4, "--ep", 4, "--redundant", 4, "--expert-load", load, "--plot", out
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_png(out)


def test_plot_without_matplotlib_exits_2_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    model, load = mixtral_with_load(tmp_path)
    out = tmp_path / "placement.png"
    result = plan(model, "--tp", 4, "--ep", 4, "--expert-load", load, "--plot", out)
    assert result.exit_code == 2
    assert "error: --plot needs matplotlib, an optional extra: pip install 'reshard[plot]'" in (
        result.output
    )
    assert not out.exists()


def test_plot_needs_ep_and_a_load_file(tmp_path):
    pytest.importorskip("matplotlib")
    model, _ = mixtral_with_load(tmp_path)
    result = plan(model, "--tp", 4, "--ep", 4, "--plot", tmp_path / "p.png")
    assert result.exit_code == 2
    assert (
        "error: --plot draws the expert placement: it needs a mixture-of-experts model, "
        "--ep > 1 and --expert-load FILE" in result.output
    )


def test_profile_experts_plot(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    from checkpoints import write_checkpoint

    src = write_checkpoint(tmp_path / "moe", "Qwen2MoeForCausalLM", num_experts=8)
    out = tmp_path / "load.png"
    result = CliRunner().invoke(
        main,
        ["profile", "experts", str(src), "--prompt-ids", "5,17,30,88", "--prompt-ids", "1,2,3",
         "--prompt-ids", "9,8,7,6,5", "--prompt-ids", "40,41", "--max-new-tokens", "2",
         "-o", str(tmp_path / "load.json"), "--plot", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    check_png(out)
