"""configs/: every YAML there is read by the CLI through --config (checked against the real commands), the
method files equal the config dataclasses' defaults, and --config really sets the defaults of a command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from retrofit.cli import app, load_cli_config
from retrofit.methods import available_methods, get_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUP = typer.main.get_command(app)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_cli_configs_name_real_commands_and_options(path):
    defaults = load_cli_config([path], GROUP)
    assert defaults and all(k in GROUP.commands for k in defaults)


def test_method_configs_are_the_dataclass_defaults():
    files = {p.stem: p for p in (CONFIGS / "methods").glob("*.yaml")}
    assert set(files) == set(available_methods())
    for key, p in files.items():
        cls = get_method(key).config_cls
        assert yaml.safe_load(p.read_text()) == dataclasses.asdict(cls()), key
        cls(**yaml.safe_load(p.read_text()))  # and they validate


def test_config_sets_command_defaults_and_the_command_line_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("static-prune:\n  k: 7\n  num-samples: 3\n")
    runner = CliRunner()
    out = runner.invoke(app, ["--config", str(f), "static-prune", "--help"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "[default: 7]" in out.output and "[default: 3]" in out.output
    assert load_cli_config([f], GROUP) == {"static-prune": {"k": 7, "num_samples": 3}}
    g = tmp_path / "d.yaml"
    g.write_text("static-prune:\n  k: 9\neval:\n  set: {skip_bias: 0.5, allow_repeat: false}\n")
    merged = load_cli_config([f, g], GROUP)  # later files win
    assert merged["static-prune"] == {"k": 9, "num_samples": 3}
    assert merged["eval"] == {"set_": ["skip_bias=0.5", "allow_repeat=false"]}


@pytest.mark.parametrize("text, message", [
    ("pipelin:\n  seed: 1\n", "is not a command"),
    ("pipeline:\n  trian_examples: 3\n", "has no option 'trian_examples'"),
    ("pipeline: 3\n", "must be a mapping"),
])
def test_bad_configs_are_refused_naming_the_file(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(typer.BadParameter, match=message):
        load_cli_config([f], GROUP)
    out = CliRunner().invoke(app, ["--config", str(f), "info"], terminal_width=200)
    assert out.exit_code != 0 and "bad.yaml" in out.output
