"""The configuration file: one table per stage, validated by the stages' own
models, refused with the table, key, value and what is allowed; the template
and `config show` read back to the same values."""

from __future__ import annotations

import json
import tomllib

import pytest

from flows.cli import main
from tasks.config import (
    _REGISTRY,
    ConfigError,
    StageConfig,
    load_config,
    render_toml,
    stage_tables,
)


def test_every_stage_has_a_table():
    assert {"index", "masters", "reduce", "photometry", "ubercal", "zp", "transients"} <= set(
        stage_tables()
    )
    assert {"ingest", "store"} <= set(stage_tables())


def test_template_round_trips_to_the_defaults():
    text = render_toml()
    assert load_config(tomllib.loads(text)).as_dict() == load_config(None).as_dict()


def test_changed_configuration_round_trips(tmp_path):
    changed = {
        "masters": {"mode": "median", "reference_period": "2026-03-05"},
        "ubercal": {"plots": False, "options": {"cells": [4, 6], "zp_mode": "exposure"}},
        "zp": {"zp_nominal_mag": {"g": 25.0, "r": 24.5, "i": 24.0}, "cnn_channels": [4, 8]},
        "photometry": {"colour_term": 0.05},
    }
    config = load_config(changed)
    path = tmp_path / "photocal.toml"
    path.write_text(render_toml(config, show_defaults=True))
    again = load_config(path)
    assert again.as_dict() == config.as_dict()
    assert again["ubercal"].options.cells == (4, 6)
    assert again["masters"].reference_period == "2026-03-05"
    assert config.changed()["masters"] == {"mode": "median", "reference_period": "2026-03-05"}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        # a wrong key, in a table and in a nested table
        ('[masters]\nmdoe = "median"\n', ["[masters] unknown key 'mdoe'", "allowed: period_days"]),
        ("[ubercal.options]\ncels = [4, 4]\n", ["[ubercal.options] unknown key 'cels'", "cells"]),
        # a wrong type and a value out of its range or choices
        ('[reduce]\nmin_flat = "low"\n', ["[reduce] min_flat = 'low'", "allowed: float"]),
        ("[masters]\nperiod_days = 0\n", ["[masters] period_days = 0", "greater than or equal"]),
        ('[masters]\nmode = "mean"\n', ["[masters] mode = 'mean'", "'ccdproc' | 'iterative'"]),
        ("[ubercal.options]\ncells = [4]\n", ["[ubercal] options.cells = [4]", "tuple[int, int]"]),
        # an unknown stage
        ("[teleport]\nspeed = 1\n", ["unknown table [teleport]", "known tables: index, masters"]),
        # what each run sets is not for the file
        ('[ubercal]\nband = "r"\n', ["[ubercal] band = 'r': set by each run"]),
        ("[masters\n", ["not valid TOML"]),
    ],
)
def test_bad_configuration_is_refused_naming_the_key(tmp_path, text, named):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path))
    for part in named:
        assert part in message


def test_overrides_win_over_the_file_and_the_file_over_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[index]\nsite_longitude_deg = 10.0\nfiles_per_task = 7\n")
    config = load_config(
        path,
        overrides={"index": {"site_longitude_deg": 20.0}},
        defaults={"index": {"files_per_task": 99, "site_longitude_deg": 30.0}},
    )
    assert config["index"].site_longitude_deg == 20.0
    assert config["index"].files_per_task == 7


def test_a_new_stage_model_appears_in_the_configuration_by_itself():
    from pydantic import Field

    class LaterStageConfig(StageConfig, table="later-stage-test"):
        """Configuration of a stage added later."""

        depth: int = Field(3, ge=1, description="How deep it goes.")

    try:
        assert "later-stage-test" in stage_tables()
        text = render_toml(tables=["later-stage-test"])
        assert "How deep it goes." in text
        assert "depth = 3" in text
        assert load_config({"later-stage-test": {"depth": 5}})["later-stage-test"].depth == 5
    finally:
        _REGISTRY.pop("later-stage-test")


def test_stage_models_refuse_unknown_keys_in_python_too():
    from tasks.masters import MastersConfig

    with pytest.raises(ValueError, match="mdoe"):
        MastersConfig(mdoe="median")


def test_config_show_prints_values_descriptions_and_defaults(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(
        '[masters]\nmode = "median"\n[store.storage_options]\nendpoint_url = "http://x"\n'
        'secret = "s3cr3t"\n'
    )
    assert main(["config", "show", "--config", str(path), "--stage", "masters"]) == 0
    out = capsys.readouterr().out
    assert 'mode = "median"  # changed' in out
    assert "Combination of the frame stack" in out
    assert 'default: "ccdproc"' in out
    assert "[ubercal]" not in out
    assert main(["config", "show", "--config", str(path), "--stage", "store"]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t" not in out
    assert 'secret = "***"' in out
    assert "http://x" in out
    assert main(["config", "show", "--stage", "nope"]) == 2
    assert "unknown table [nope]" in capsys.readouterr().err


def test_config_template_is_a_loadable_starting_file(tmp_path, capsys):
    assert main(["config", "template"]) == 0
    text = capsys.readouterr().out
    assert text.count("\n# ") > 100  # commented
    path = tmp_path / "photocal.toml"
    path.write_text(text)
    assert load_config(path).as_dict() == load_config(None).as_dict()


def test_run_refuses_a_bad_configuration_before_any_work(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[ubercal.options]\nsolver = 'magic'\n")
    argv = ["run", "--store", str(tmp_path / "s.zarr"), "--stages", "ubercal"]
    assert main([*argv, "--refcat", "r.fits", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[ubercal] options.solver = 'magic'" in err
    assert not (tmp_path / "s.zarr").exists()


def test_zp_config_is_folded_into_the_zp_table_with_a_deprecation(tmp_path, capsys):
    import argparse

    from flows.cli import _run_config

    zp = tmp_path / "zp.json"
    zp.write_text(json.dumps({"epochs": 3, "patch_px": 16}))
    toml = tmp_path / "c.toml"
    toml.write_text("[zp]\nepochs = 9\nseed = 4\n")
    config = _run_config(argparse.Namespace(config=toml, zp_config=zp))
    assert (config["zp"].epochs, config["zp"].patch_px, config["zp"].seed) == (3, 16, 4)
    assert "--zp-config is deprecated" in capsys.readouterr().err
