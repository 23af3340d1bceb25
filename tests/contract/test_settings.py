"""Settings declared once: environment variable, flag, bounds and help text from one field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from memspace_contract.settings import SettingsError
from memspace_operator.settings import Settings as OperatorSettings
from memspace_server.settings import ServerSettings


def test_every_server_setting_has_a_flag_an_environment_variable_and_help() -> None:
    parser = argparse.ArgumentParser()
    ServerSettings.add_arguments(parser)
    text = parser.format_help()
    for name, field in ServerSettings.model_fields.items():
        env = ServerSettings.env(name)
        flag = ServerSettings.flag(name)
        assert env.startswith("MEMSPACE_")
        assert flag == "--" + env.removeprefix("MEMSPACE_").lower().replace("_", "-")
        assert flag in text
        assert env in text
        assert field.description


def test_a_flag_wins_over_the_environment_and_the_environment_over_the_default(
    tmp_path: Path,
) -> None:
    environ = {"MEMSPACE_DATA_ROOT": str(tmp_path), "MEMSPACE_MAX_BATCH": "7"}
    loaded = ServerSettings.load(environ, {"max_batch": "9", "listen": None})
    assert loaded.max_batch == 9
    assert loaded.listen == "127.0.0.1:50051"
    assert ServerSettings.load(environ).max_batch == 7


def test_defaults_never_read_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSPACE_SERVER_NAMESPACE", "elsewhere")
    assert OperatorSettings().server_namespace == "memspace-system"


def test_settings_are_frozen() -> None:
    settings = OperatorSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.max_shards = 3


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"MEMSPACE_SERVER_RESOURCES": "{not json"}, "MEMSPACE_SERVER_RESOURCES is not valid JSON"),
        ({"MEMSPACE_SERVER_RESOURCES": "[1]"}, "not a JSON object"),
        ({"MEMSPACE_API_CONCURRENCY": "0"}, "MEMSPACE_API_CONCURRENCY is 0; it must be at least 1"),
        ({"MEMSPACE_RESYNC_INTERVAL": "0"}, "MEMSPACE_RESYNC_INTERVAL is 0; it must be above 0"),
    ],
)
def test_an_unusable_value_is_named_with_what_is_allowed(
    environ: dict[str, str], says: str
) -> None:
    with pytest.raises(SettingsError, match=says):
        OperatorSettings.from_env(environ)


def test_blank_variables_count_as_unset() -> None:
    assert OperatorSettings.from_env({"MEMSPACE_MAX_SHARDS": "  "}).max_shards == 50
