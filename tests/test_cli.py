import subprocess

import pytest

from conftest import drzero_command
from drzero.cli import build_parser, main
from drzero.retrieval.server import RetrieverConfig
from drzero.config import ConfigError


from drzero.cli import commands


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_command_explains_its_options(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "drzero " in out  # the module docstring with a launch example
    for action in build_parser()._subparsers._group_actions[0].choices[command]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"


def test_console_entry_point_runs():
    result = subprocess.run(drzero_command("--help"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "serve-retriever" in result.stdout


def test_bad_option_values_exit_2_naming_the_field(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["ingest", str(tmp_path), "--db", str(tmp_path / "db"), "--max-words", "3"])
    assert done.value.code == 2
    assert "max_words=3 is not valid: expected an integer >= 20" in capsys.readouterr().err


def test_ingest_without_sources_says_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["ingest", "--db", str(tmp_path / "db")])
    assert done.value.code == 2
    assert "at least one SOURCE, or --demo" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,field", [({"port": 0}, "port"), ({"topk": 60}, "topk"),
                                             ({"max_batch": 0}, "max_batch"), ({"max_wait_ms": -1}, "max_wait_ms")])
def test_retriever_config_validation(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        RetrieverConfig(db="x", **overrides)


def test_search_cli_against_the_store_and_the_server(demo_db, retriever, capsys):
    assert main(["search", "--demo-db", str(demo_db), "--url", retriever.url, "--wait", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("known answer:") == 4 and "1. [" in out
    assert main(["search", "Federated Learning", "--db", str(demo_db), "--topk", "2"]) == 0
    out = capsys.readouterr().out
    assert "Q: Federated Learning" in out and "2. [" in out and "3. [" not in out


def test_search_cli_names_an_unreachable_retriever(capsys):
    with pytest.raises(SystemExit) as done:
        main(["search", "x", "--url", "http://127.0.0.1:9", "--wait", "1"])
    assert done.value.code == 2
    assert "http://127.0.0.1:9 did not answer /health" in capsys.readouterr().err


def test_hydra_overrides_are_refused_by_commands_that_run_no_verl(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["merge", "--dry-run", "--checkpoints", str(tmp_path), "--", "trainer.save_freq=10"])
    assert done.value.code == 2
    assert "only challenger, solver, evolve and preflight take them" in capsys.readouterr().err
