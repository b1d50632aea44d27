"""The secrets medstream keys its pseudonyms, sealed dead letters and audit records with.

Each secret is either configured (its environment variable, the same value on every process
that needs it: the way to run several hosts) or, when unset, kept in the data directory as
``keys/<name>.key``: 32 random bytes (hex) that `medstream up` creates on first start, in a
directory only the owner may enter, in a file only the owner may read. No secret has a
default: the demo values earlier releases shipped, and the placeholders of the deployment
examples, are refused wherever they are set, since anyone can recompute a person_key from
an MRN (or open a dead letter, or forge an audit record) with a published key.

A data-directory key must stay with the data: person_keys made with another pseudonym key
never match the stored ones, and dead letters sealed with another secret cannot be opened.
Back the keys directory up with the data (it is not inside the ClickHouse backup).
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydantic import SecretStr

#: Shortest configured secret accepted (the data-directory keys have 64 hex characters).
MIN_SECRET_CHARS: Final = 32
KEYS_DIR: Final = "keys"


class SecretRefused(ValueError):
    """A secret is missing, a published demo value, too short, or readable by others; the
    message names the setting (or file) to fix."""


@dataclass(frozen=True)
class SecretSpec:
    """One secret: the setting that configures it and the data-directory file that stands
    in when the setting is empty."""

    setting: str
    file_name: str
    purpose: str
    demo_values: frozenset[str] = field(default_factory=frozenset)


PSEUDONYM_KEY: Final = SecretSpec(
    "MEDSTREAM_STREAMS_PSEUDONYM_KEY", "pseudonym.key",
    "the pseudonym key (person_key, encounter_key and the patient index tokens)",
    frozenset({"medstream-embedded-demo-key-change-me", "change-me-to-a-long-random-secret"}),
)
DEAD_LETTER_SECRET: Final = SecretSpec(
    "MEDSTREAM_SINK_DEAD_LETTER_SECRET", "dead-letter.key",
    "the dead-letter sealing secret",
    frozenset({
        "medstream-embedded-demo-dead-letter-secret-change-me",
        "change-me-to-another-long-random-secret",
    }),
)
AUDIT_KEY: Final = SecretSpec(
    "MEDSTREAM_AUDIT_KEY", "audit.key",
    "the audit key (authenticates audit records between their writers and the sink)",
    frozenset({"change-me-to-a-third-long-random-secret"}),
)
SECRETS: Final = (PSEUDONYM_KEY, DEAD_LETTER_SECRET, AUDIT_KEY)


def key_path(data_dir: Path, spec: SecretSpec) -> Path:
    """The file holding a secret of this data directory."""
    return data_dir / KEYS_DIR / spec.file_name


#: Every value medstream ever published for any secret: each is refused for every secret
#: (a demo pseudonym key is no better as an audit key).
PUBLISHED_VALUES: Final = frozenset().union(*(spec.demo_values for spec in SECRETS))


def _checked(spec: SecretSpec, value: str, source: str) -> bytes:
    if value in PUBLISHED_VALUES:
        raise SecretRefused(
            f"{source} holds the published demo value of {spec.purpose}: anyone can recompute "
            f"what it protects. Set {spec.setting} to a random secret (e.g. `python3 -c "
            "'import secrets; print(secrets.token_hex(32))'`), or leave it unset for `medstream "
            "up` to keep a random one in the data directory"
        )
    if len(value) < MIN_SECRET_CHARS:
        raise SecretRefused(
            f"{source} is too short for {spec.purpose}: {len(value)} characters, at least "
            f"{MIN_SECRET_CHARS} needed (set {spec.setting} to a longer random secret)"
        )
    return value.encode()


def resolve_secret(spec: SecretSpec, configured: SecretStr, data_dir: Path | None) -> bytes:
    """The configured secret, or the data directory's; SecretRefused when neither is usable."""
    value = configured.get_secret_value()
    if value:
        return _checked(spec, value, spec.setting)
    if data_dir is None:
        raise SecretRefused(f"{spec.setting} is not set: {spec.purpose} is needed here")
    path = key_path(data_dir, spec)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretRefused(
                f"{path} ({spec.purpose}) is open to other users (mode {stat.filemode(mode)}): "
                f"`chmod 600 {path}`"
            )
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise SecretRefused(
            f"{spec.setting} is not set and {path} does not exist: set {spec.setting} (the "
            "same value on every process that needs it), or start with `medstream up`, which "
            "keeps a random one in the data directory"
        ) from None
    return _checked(spec, text, str(path))


def configured_secrets() -> dict[SecretSpec, SecretStr]:
    """Each secret as its setting holds it in this environment (empty when unset)."""
    from medstream.settings import AuditSettings, SinkSettings, StreamSettings

    return {
        PSEUDONYM_KEY: StreamSettings().pseudonym_key,
        DEAD_LETTER_SECRET: SinkSettings().dead_letter_secret,
        AUDIT_KEY: AuditSettings().key,
    }


def ensure_data_dir_secrets(data_dir: Path) -> list[Path]:
    """Check the configured secrets and create the data directory's key file of every one
    left unset (owner-only); returns the files created. SecretRefused on a bad secret."""
    created = []
    for spec, value in configured_secrets().items():
        if value.get_secret_value():
            resolve_secret(spec, value, None)
            continue
        path = key_path(data_dir, spec)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            resolve_secret(spec, value, data_dir)  # an existing key must be usable
            continue
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        created.append(path)
    return created
