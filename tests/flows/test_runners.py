"""Site values over a cluster spec: --cluster-option KEY=VALUE."""

from __future__ import annotations

import pytest

from flows.runners import load_cluster_spec, make_task_runner, parse_cluster_options


def test_options_override_the_spec_and_its_adaptivity():
    options = parse_cluster_options(
        ["queue=debug", "cores=1", "account=null", "adapt.maximum_jobs=2", "walltime=00:20:00"]
    )
    assert options == {
        "queue": "debug",
        "cores": 1,
        "account": None,
        "adapt.maximum_jobs": 2,
        "walltime": "00:20:00",
    }
    runner = make_task_runner(cluster="slurm", cluster_options=options)
    spec = load_cluster_spec("slurm")
    assert runner.cluster_kwargs == {**spec.cluster_kwargs, **{
        k: v for k, v in options.items() if not k.startswith("adapt.")
    }}  # fmt: skip
    assert runner.adapt_kwargs == {"minimum_jobs": 0, "maximum_jobs": 2}
    assert not make_task_runner(cluster="slurm", cluster_options={"adapt": None}).adapt_kwargs


@pytest.mark.parametrize("item", ["queue", "=3", ""])
def test_bad_options_are_named(item):
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_cluster_options([item])


def test_the_command_line_reports_a_bad_option(capsys, tmp_path):
    from flows.cli import main

    code = main(["run", "--store", str(tmp_path / "s"), "--stages", "masters",
                 "--cluster-option", "cores"])  # fmt: skip
    assert code == 2
    assert "cluster option 'cores' is not KEY=VALUE" in capsys.readouterr().err
