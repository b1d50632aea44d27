"""The secrets and the data directory: the published demo keys are refused with the setting
to change, a fresh data directory gets owner-only random keys, and a data directory open
to other users is closed on start."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from medstream.keys import (
    AUDIT_KEY,
    DEAD_LETTER_SECRET,
    PSEUDONYM_KEY,
    SECRETS,
    SecretRefused,
    ensure_data_dir_secrets,
    key_path,
    resolve_secret,
)
from medstream.runtime import private_data_dir

DEMO_PSEUDONYM_KEY = "medstream-embedded-demo-key-change-me"
DEMO_DEAD_LETTER_SECRET = "medstream-embedded-demo-dead-letter-secret-change-me"


def _medstream(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MEDSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    clean.update(MEDSTREAM_DATA_DIR=str(data_dir), **env)
    return subprocess.run([sys.executable, "-m", "medstream", *args], env=clean,
                          capture_output=True, text=True, timeout=120)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("command", "setting", "value"),
    [
        (("streams",), "MEDSTREAM_STREAMS_PSEUDONYM_KEY", DEMO_PSEUDONYM_KEY),
        (("sink",), "MEDSTREAM_SINK_DEAD_LETTER_SECRET", DEMO_DEAD_LETTER_SECRET),
        (("up", "--no-console"), "MEDSTREAM_STREAMS_PSEUDONYM_KEY", DEMO_PSEUDONYM_KEY),
        (("up", "--no-console"), "MEDSTREAM_SINK_DEAD_LETTER_SECRET", DEMO_DEAD_LETTER_SECRET),
    ],
)
def test_the_published_demo_keys_are_refused(
    tmp_path: Path, command: tuple[str, ...], setting: str, value: str
) -> None:
    done = _medstream(tmp_path / "data", *command, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
                      **{setting: value})
    assert done.returncode == 2, done.stdout + done.stderr
    said = done.stdout + done.stderr
    assert f"{setting} holds the published demo value" in said
    assert value not in said  # the message names the setting, never echoes a secret
    assert not (tmp_path / "data" / "runtime.json").exists()  # nothing was started


def test_a_component_without_a_key_is_refused_with_the_setting_to_set(tmp_path: Path) -> None:
    done = _medstream(tmp_path / "data", "streams", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert done.returncode == 2
    assert "MEDSTREAM_STREAMS_PSEUDONYM_KEY is not set" in done.stderr
    assert "medstream up" in done.stderr


def test_a_fresh_data_directory_gets_owner_only_random_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert private_data_dir(data_dir) is None  # created owner-only: nothing to warn about
    assert _mode(data_dir) == 0o700
    created = ensure_data_dir_secrets(data_dir)
    assert created == [key_path(data_dir, spec) for spec in SECRETS]
    assert _mode(data_dir / "keys") == 0o700
    values = set()
    for spec in SECRETS:
        assert _mode(key_path(data_dir, spec)) == 0o600
        secret = resolve_secret(spec, SecretStr(""), data_dir)
        assert len(secret) == 64
        values.add(secret)
    assert len(values) == 3  # one independent key per purpose
    assert ensure_data_dir_secrets(data_dir) == []  # kept: the data depends on them
    assert resolve_secret(PSEUDONYM_KEY, SecretStr(""), data_dir) in values
    # A configured secret wins over the file.
    configured = "a-configured-secret-0123456789abcdef"
    assert resolve_secret(AUDIT_KEY, SecretStr(configured), data_dir) == configured.encode()


def test_a_key_file_others_can_read_or_a_short_secret_is_refused(tmp_path: Path) -> None:
    ensure_data_dir_secrets(tmp_path)
    path = key_path(tmp_path, DEAD_LETTER_SECRET)
    path.chmod(0o644)
    with pytest.raises(SecretRefused, match=f"chmod 600 {path}"):
        resolve_secret(DEAD_LETTER_SECRET, SecretStr(""), tmp_path)
    with pytest.raises(SecretRefused, match="MEDSTREAM_AUDIT_KEY"):
        resolve_secret(AUDIT_KEY, SecretStr("short"), tmp_path)
    with pytest.raises(SecretRefused, match="MEDSTREAM_AUDIT_KEY is not set"):
        resolve_secret(AUDIT_KEY, SecretStr(""), None)


def test_a_data_directory_open_to_others_is_closed_on_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "clickhouse").mkdir(parents=True)
    data_dir.chmod(0o755)
    (data_dir / "clickhouse").chmod(0o755)
    (data_dir / "sink.log").write_text("log\n")
    (data_dir / "sink.log").chmod(0o644)
    warning = private_data_dir(data_dir)
    assert warning is not None and "was open to other users" in warning
    assert "2 files and directories" in warning
    assert _mode(data_dir) == 0o700
    assert _mode(data_dir / "clickhouse") == 0o700
    assert _mode(data_dir / "sink.log") == 0o600
    assert private_data_dir(data_dir) is None


def test_every_published_value_is_refused_for_every_secret() -> None:
    """Review of issue 15: a placeholder of one secret was accepted as another secret."""
    published = sorted({value for spec in SECRETS for value in spec.demo_values})
    assert len(published) >= 3
    for spec in SECRETS:
        for value in published:
            with pytest.raises(SecretRefused, match="published demo value"):
                resolve_secret(spec, SecretStr(value), None)


def test_a_command_run_before_up_creates_the_data_directory_owner_only(tmp_path: Path) -> None:
    """Review of issue 15: `medstream users add` on a fresh data directory made it 0755 with
    the engine inside, readable by every local user until the next `up`."""
    data = tmp_path / "fresh"
    done = _medstream(data, "migrate")
    assert done.returncode == 0, done.stderr
    assert _mode(data) == 0o700
    opened = [p for p in data.rglob("*") if not p.is_symlink() and _mode(p) & 0o077]
    assert opened == []
