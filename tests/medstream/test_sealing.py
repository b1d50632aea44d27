"""Sealed dead-letter payloads: AES-256-GCM roundtrip, wrong key, tampering, truncation, AAD."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medstream.sealing import (
    HEADER_BYTES,
    MIN_SEALED_BYTES,
    SEALED_FORMAT_VERSION,
    TAG_BYTES,
    SealingError,
    derive_key,
    key_id,
    seal,
    unseal,
)

SECRET = b"synthetic test secret, 32 bytes!"
KEY = derive_key(SECRET, "dead-letter")
OTHER_KEY = derive_key(SECRET, "export")
# A raw HL7 message of an invented patient (fictional area code 990101).
PAYLOAD = (
    "MSH|^~\\&|LIS|H001|||20261124083000||ORU^R01|M1|P|2.5\r"
    "PID|1||H001P000000123||ZHANG^WEI||19800101|M|||||13800138000\r"
    "NTE|1||身份证 990101198001011237\r"
).encode()


def test_roundtrip_restores_the_exact_bytes_and_hides_them() -> None:
    sealed = seal(PAYLOAD, KEY, b"dlq-1")
    assert unseal(sealed, KEY, b"dlq-1") == PAYLOAD
    assert len(sealed) == HEADER_BYTES + len(PAYLOAD) + TAG_BYTES
    assert sealed[0] == SEALED_FORMAT_VERSION
    assert sealed[1:5] == hashlib.sha256(KEY).digest()[:4] == key_id(KEY)
    for clear_fragment in (b"ZHANG", b"13800138000", b"990101198001011237", b"PID|"):
        assert clear_fragment not in sealed


def test_every_seal_uses_a_fresh_nonce() -> None:
    first, second = seal(PAYLOAD, KEY), seal(PAYLOAD, KEY)
    assert first != second
    assert first[5:HEADER_BYTES] != second[5:HEADER_BYTES]
    assert unseal(first, KEY) == unseal(second, KEY) == PAYLOAD


def test_layout_is_plain_aes_gcm_over_the_header_and_associated_data() -> None:
    # The format can be opened by any AES-GCM implementation that knows the layout.
    sealed = seal(b"abc", KEY, b"row-7")
    header, nonce, body = sealed[:5], sealed[5:HEADER_BYTES], sealed[HEADER_BYTES:]
    assert AESGCM(KEY).decrypt(nonce, body, header + b"row-7") == b"abc"


def test_wrong_key_is_named_as_such_with_both_key_ids() -> None:
    sealed = seal(PAYLOAD, KEY)
    with pytest.raises(SealingError, match="wrong key") as excinfo:
        unseal(sealed, OTHER_KEY)
    assert key_id(KEY).hex() in str(excinfo.value)
    assert key_id(OTHER_KEY).hex() in str(excinfo.value)


@pytest.mark.parametrize("position", [HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 20, -1])
def test_a_changed_nonce_ciphertext_or_tag_byte_fails_authentication(position: int) -> None:
    sealed = bytearray(seal(PAYLOAD, KEY))
    sealed[position] ^= 0x01
    with pytest.raises(SealingError, match="authentication failed"):
        unseal(bytes(sealed), KEY)


def test_a_changed_key_id_byte_is_reported_as_a_wrong_key() -> None:
    sealed = bytearray(seal(PAYLOAD, KEY))
    sealed[2] ^= 0x01
    with pytest.raises(SealingError, match="wrong key"):
        unseal(bytes(sealed), KEY)


@pytest.mark.parametrize("length", [0, 1, 5, HEADER_BYTES, MIN_SEALED_BYTES - 1])
def test_input_shorter_than_header_and_tag_is_reported_truncated(length: int) -> None:
    sealed = seal(PAYLOAD, KEY)[:length]
    with pytest.raises(SealingError, match=f"truncated: {length} bytes, at least 33"):
        unseal(sealed, KEY)


def test_input_cut_inside_the_ciphertext_fails_authentication() -> None:
    sealed = seal(PAYLOAD, KEY)
    with pytest.raises(SealingError, match="authentication failed"):
        unseal(sealed[:-1], KEY)


def test_unknown_version_is_named() -> None:
    sealed = b"\x02" + seal(PAYLOAD, KEY)[1:]
    with pytest.raises(SealingError, match=r"unknown sealed format version 0x02"):
        unseal(sealed, KEY)


def test_associated_data_must_match() -> None:
    sealed = seal(PAYLOAD, KEY, b"dlq-1")
    with pytest.raises(SealingError, match="associated data"):
        unseal(sealed, KEY, b"dlq-2")
    with pytest.raises(SealingError, match="associated data"):
        unseal(sealed, KEY)


def test_empty_payload_seals_to_header_and_tag() -> None:
    sealed = seal(b"", KEY)
    assert len(sealed) == MIN_SEALED_BYTES == 33
    assert unseal(sealed, KEY) == b""


def test_one_megabyte_payload_roundtrips() -> None:
    payload = bytes(range(256)) * 4096
    assert len(payload) == 1 << 20
    sealed = seal(payload, KEY, b"big")
    assert len(sealed) == len(payload) + MIN_SEALED_BYTES
    assert unseal(sealed, KEY, b"big") == payload


@pytest.mark.parametrize("bad_key", [b"", b"k" * 16, b"k" * 31, b"k" * 33])
def test_keys_other_than_32_bytes_are_refused(bad_key: bytes) -> None:
    with pytest.raises(SealingError, match=f"32 bytes .AES-256., got {len(bad_key)}"):
        seal(PAYLOAD, bad_key)
    with pytest.raises(SealingError, match="32 bytes"):
        unseal(seal(PAYLOAD, KEY), bad_key)


def test_derive_key_is_stable_and_separates_purposes() -> None:
    assert derive_key(SECRET, "dead-letter") == KEY
    assert len(KEY) == 32
    assert KEY != OTHER_KEY
    assert derive_key(b"another synthetic secret 32 byte", "dead-letter") != KEY


def test_derive_key_matches_the_hkdf_definition() -> None:
    # RFC 5869 by hand with hashlib/hmac: PRK = HMAC(zeros, IKM); T(1) = HMAC(PRK, info | 0x01).
    prk = hmac.new(b"\x00" * 32, SECRET, hashlib.sha256).digest()
    okm = hmac.new(prk, b"medstream.sealing.v1|dead-letter" + b"\x01", hashlib.sha256).digest()
    assert derive_key(SECRET, "dead-letter") == okm


def test_derive_key_refuses_short_secrets_and_blank_purposes() -> None:
    with pytest.raises(SealingError, match="at least 16 bytes"):
        derive_key(b"short", "dead-letter")
    with pytest.raises(SealingError, match="purpose must not be empty"):
        derive_key(SECRET, "  ")


def test_non_bytes_inputs_are_refused() -> None:
    with pytest.raises(SealingError, match="payload must be bytes, not str"):
        seal("text", KEY)  # type: ignore[arg-type]
    with pytest.raises(SealingError, match="sealed payload must be bytes, not str"):
        unseal("text", KEY)  # type: ignore[arg-type]
