"""`memspace serve` settings: flags over environment over defaults, checked once at start."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from memspace_server import settings


def parse(argv: list[str], environ: dict[str, str] | None = None) -> settings.ServerSettings:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return settings.load(vars(parser.parse_args(argv)), environ or {})


def test_defaults_are_a_loopback_standalone_server(tmp_path: Path) -> None:
    loaded = parse(["--data-root", str(tmp_path)])
    assert loaded.data_root == tmp_path
    assert loaded.listen == "127.0.0.1:50051"
    assert loaded.index_dir is None
    assert not loaded.managed
    assert loaded.admin_token_file is None
    assert loaded.drain_timeout_s == 25.0


def test_the_environment_fills_what_flags_leave_out(tmp_path: Path) -> None:
    environ = {
        "MEMSPACE_DATA_ROOT": str(tmp_path),
        "MEMSPACE_INDEX_DIR": "/etc/memspace/spaces",
        "MEMSPACE_LISTEN": "0.0.0.0:50051",
        "MEMSPACE_DRAIN_TIMEOUT": "12.5",
        "MEMSPACE_MAX_RECEIVE_MESSAGE_BYTES": "1048576",
        "MEMSPACE_LOG_FORMAT": "json",
    }
    loaded = parse(["--listen", "127.0.0.1:6000"], environ)
    assert loaded.listen == "127.0.0.1:6000"  # the flag wins
    assert loaded.index_dir == Path("/etc/memspace/spaces")
    assert loaded.managed
    assert loaded.drain_timeout_s == 12.5
    assert loaded.max_receive_message_bytes == 1048576
    assert loaded.log_format == "json"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "--data-root"),
        (["--data-root", "d", "--listen", "nowhere"], "HOST:PORT"),
        (["--data-root", "d", "--listen", "h:99999"], "HOST:PORT"),
        (["--data-root", "d", "--drain-timeout", "soon"], "not a float"),
        (["--data-root", "d", "--drain-timeout", "0"], "above 0"),
        (["--data-root", "d", "--log-format", "xml"], "text, json"),
        (["--data-root", "d", "--default-embedding-dim", "5000"], "1..4096"),
        (["--data-root", "d", "--drain-notice", "30"], "drain timeout"),
        (["--data-root", "d", "--default-embedding-model", "bert"], "does not offer"),
        (
            [
                "--data-root",
                "d",
                "--embedding-models",
                "none",
                "--default-embedding-model",
                "wordllama-l2-256",
            ],
            "offered: none",
        ),
    ],
)
def test_bad_settings_say_what_is_wrong(argv: list[str], says: str) -> None:
    with pytest.raises(settings.SettingsError, match=says):
        parse(argv)


def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    assert parse(["--data-root", str(tmp_path), "--metrics-listen", "off"]).metrics_listen == "off"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert settings.is_loopback(host) is loopback


def test_threads_hand_over_within_half_a_millisecond_by_default(tmp_path: Path) -> None:
    assert parse(["--data-root", str(tmp_path)]).thread_switch_ms == 0.5
    environ = {"MEMSPACE_THREAD_SWITCH_MS": "2"}
    assert parse(["--data-root", str(tmp_path)], environ).thread_switch_ms == 2.0
    with pytest.raises(settings.SettingsError, match="thread"):
        parse(["--data-root", str(tmp_path), "--thread-switch-ms", "0"])


def test_the_server_runs_on_uvloop_unless_told_otherwise(tmp_path: Path) -> None:
    assert parse(["--data-root", str(tmp_path)]).event_loop == "uvloop"
    environ = {"MEMSPACE_EVENT_LOOP": "asyncio"}
    assert parse(["--data-root", str(tmp_path)], environ).event_loop == "asyncio"
    with pytest.raises(settings.SettingsError, match="event-loop"):
        parse(["--data-root", str(tmp_path), "--event-loop", "trio"])
