"""Master patient index ("one person, one file", 一人一档): links patient records to persons.

A patient *record* is one organisation's MRN, pseudonymised as ``record_key`` (the
``person_key`` of normalised events). The index groups records into master *persons*
whose ``person_key`` is a keyed pseudonym, and emits one :class:`LinkEvent` per decision
(link, merge, unmerge, review) so membership at any past time can be rebuilt
(:func:`membership_at`).

Privacy: the normalise stage, which sees demographics in clear, turns them into an
identity observation of keyed tokens with :class:`IdentityTokeniser`; the index only ever
sees tokens, a keyed Bloom filter of the name, the birth date and the sex.

Linking: a valid national ID token known to a person links deterministically; otherwise
a Fellegi-Sunter comparison (weights in ``streams/rules/mpi.yaml``) against the records
sharing a birth date or phone token links, flags for review, or founds a new person.
Records with different valid national IDs are never linked.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import struct
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

from pydantic import field_validator, model_validator
from pypinyin import Style, lazy_pinyin

from streams.findings import KeyValueState
from streams.model import NonBlank, as_date, epoch_ms
from streams.pseudonym import MIN_KEY_BYTES, PSEUDONYM_HEX_CHARS
from streams.rules_file import StrictModel, read_rules_document, validate_rules

DEFAULT_MPI_RULES_PATH: Final[Path] = Path(__file__).resolve().parent / "rules" / "mpi.yaml"

#: Size of the name Bloom filter in bits and hash functions per bigram (Schnell et al.
#: 2009 used 1000 bits and 30; names here are short pinyin, so 512 bits keep collisions
#: between unrelated names low while the filter stays 128 hex characters).
NAME_BLOOM_BITS: Final = 512
NAME_BLOOM_HASHES: Final = 16

#: Link decisions and linkage methods, as they appear in LinkEvent.action and .method.
ACTIONS: Final = ("link", "merge", "unmerge", "review")
METHODS: Final = ("national_id", "organisation_mrn", "probabilistic", "manual")
NID_STATUSES: Final = ("valid", "invalid", "absent")

# GB 11643-1999 (ISO 7064 MOD 11-2): weight of each of the first 17 digits = 2^(17-i) mod 11,
# and the check character for each remainder of the weighted sum mod 11.
_NID_WEIGHTS: Final = tuple(pow(2, 17 - i, 11) for i in range(17))
_NID_CHECK: Final = "10X98765432"
_NID_SHAPE: Final = re.compile(r"^\d{17}[\dX]$")
# Nobody alive was born before this year: an earlier birth part is a keying error.
_NID_MIN_YEAR: Final = 1900

_MOBILE: Final = re.compile(r"^1[3-9]\d{9}$")
_PHONE_NOISE: Final = re.compile(r"[\s\-().]")

_HAN: Final = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_NAME_SEPARATOR: Final = re.compile(r"[·•・.．]")
_NOT_LETTER: Final = re.compile(r"[^a-z]")

# Two-character Chinese family names (the common ones): the rest of the name is given.
_COMPOUND_SURNAMES: Final = frozenset(
    "欧阳 司马 诸葛 上官 东方 皇甫 尉迟 公孙 慕容 长孙 宇文 司徒 夏侯 令狐 澹台 端木 万俟 "
    "轩辕 南宫 西门 百里 呼延 独孤 申屠 太史 闻人 钟离 赫连 拓跋 第五".split()
)
# Family names read differently from the character's common reading (pypinyin has no
# surname mode): 单 is Shan as a family name, not dan.
_SURNAME_READINGS: Final = {
    "单": "shan", "曾": "zeng", "区": "ou", "仇": "qiu", "解": "xie", "朴": "piao",
    "查": "zha", "盖": "ge", "乐": "yue", "缪": "miao", "覃": "qin", "翟": "zhai",
    "秘": "bi", "种": "chong", "召": "shao", "员": "yun", "莘": "shen", "尉迟": "yuchi",
    "长孙": "zhangsun", "万俟": "moqi", "繁": "po", "晟": "cheng", "宓": "mi", "黑": "he",
    "藏": "zang", "重": "chong", "句": "gou", "能": "nai", "折": "she", "逄": "pang",
}

_SEX_CODES: Final = {
    # GB/T 2261.1-2003: 0 unknown, 1 male, 2 female, 9 unspecified; HL7 table 0001.
    "m": "M", "male": "M", "1": "M", "男": "M",
    "f": "F", "female": "F", "2": "F", "女": "F",
    "u": "U", "unknown": "U", "0": "U", "9": "U", "o": "U", "a": "U", "n": "U", "未知": "U",
}

_LENGTH: Final = struct.Struct(">I")


def _frame(*parts: bytes) -> bytes:
    # Length-prefixing keeps ("ab", "c") and ("a", "bc") apart.
    return b"".join(_LENGTH.pack(len(part)) + part for part in parts)


def _checked_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray):
        raise TypeError("the MPI key must be bytes")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the MPI key must be at least {MIN_KEY_BYTES} bytes long")
    return bytes(key)


# --- national ID (GB 11643-1999) --------------------------------------------------------


def national_id_check_digit(first17: str) -> str:
    """The check character (0-9 or X) of the first 17 digits of a citizen ID (ISO 7064 MOD 11-2)."""
    if len(first17) != 17 or not first17.isascii() or not first17.isdigit():
        raise ValueError("a citizen ID check digit needs exactly 17 ASCII digits")
    total = sum(int(digit) * weight for digit, weight in zip(first17, _NID_WEIGHTS, strict=True))
    return _NID_CHECK[total % 11]


def _nid_birth_date(nid: str) -> date | None:
    try:
        born = date(int(nid[6:10]), int(nid[10:12]), int(nid[12:14]))
    except ValueError:
        return None
    return born if born.year >= _NID_MIN_YEAR else None


def _normalised_nid(text: str) -> str:
    return text.strip().upper()


def is_valid_national_id(text: str, today: date | None = None) -> bool:
    """True for an 18-character citizen ID with a real, not future birth date and right check digit.

    Outer blanks are ignored and a lowercase x is accepted. ``today`` (default: the UTC date
    now) bounds the birth date; birth years before 1900 count as keying errors.
    15-digit first-generation IDs are not valid here.
    """
    nid = _normalised_nid(text)
    if not _NID_SHAPE.match(nid):
        return False
    born = _nid_birth_date(nid)
    if born is None or born > (today or datetime.now(UTC).date()):
        return False
    return national_id_check_digit(nid[:17]) == nid[17]


# --- demographics normalisation ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NormalisedName:
    """A name as lowercase ASCII letters: family name and given name ("" when unknown)."""

    family: str
    given: str

    @property
    def text(self) -> str:
        """Family name first, one blank before the given name: ``zhang wei``."""
        return " ".join(part for part in (self.family, self.given) if part)


def _letters(text: str) -> str:
    # ü -> u (pinyin lü is written LU on older documents), é -> e: drop combining marks.
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(char for char in decomposed if not unicodedata.combining(char))
    return _NOT_LETTER.sub("", stripped)


def _pinyin(han: str) -> str:
    syllables = lazy_pinyin(han, style=Style.NORMAL, v_to_u=True, errors="ignore")
    return _letters("".join(syllables))


def _han_name(text: str) -> NormalisedName:
    if _NAME_SEPARATOR.search(text):
        # Transliterated minority names (阿依古丽·买买提) have no family-first order to
        # rely on: the parts are kept in written order as the given name.
        parts = [_pinyin(part) for part in _NAME_SEPARATOR.split(text)]
        return NormalisedName("", "".join(parts))
    han = "".join(_HAN.findall(text))
    split = 2 if han[:2] in _COMPOUND_SURNAMES else 1
    family, given = han[:split], han[split:]
    return NormalisedName(_SURNAME_READINGS.get(family) or _pinyin(family), _pinyin(given))


def _latin_name(text: str) -> NormalisedName:
    if "^" in text:
        # HL7 v2 XPN: FAMILY^GIVEN^MIDDLE^SUFFIX^PREFIX; middle names join the given name.
        components = text.split("^")
        given = " ".join(components[1:3]) if len(components) > 1 else ""
        return NormalisedName(_letters(components[0]), _letters(given))
    if "," in text:
        family, _, given = text.partition(",")
        return NormalisedName(_letters(family), _letters(given))
    words = text.split()
    if len(words) <= 1:
        return NormalisedName("", _letters(text))
    return NormalisedName(_letters(words[-1]), _letters("".join(words[:-1])))


def normalise_name(name: str | None) -> NormalisedName | None:
    """A person's name as lowercase letters, family name first where it is known, or None.

    Rule: a name with Han characters is pinyin without tones (ü written u), the first
    character (or a known two-character family name such as 欧阳) is the family name and
    common surname readings are used (单 = shan); a Latin name is HL7 ``FAMILY^GIVEN``,
    ``Family, Given`` or ``Given Family`` (last word = family), accents dropped; one word
    is a given name with unknown family. Blanks, hyphens and apostrophes are removed inside
    each part, so 张小明, ZHANG^XIAO MING and Xiao-Ming Zhang all give ``zhang xiaoming``.
    """
    if name is None:
        return None
    text = name.strip()
    normalised = _han_name(text) if _HAN.search(text) else _latin_name(text)
    return normalised if normalised.text else None


def normalise_mobile(phone: str | None) -> str | None:
    """A mainland China mobile number as 11 digits (+86, 0086, blanks, dashes removed), or None."""
    if phone is None:
        return None
    digits = _PHONE_NOISE.sub("", phone)
    for prefix in ("+86", "0086"):
        if digits.startswith(prefix):
            digits = digits[len(prefix) :]
            break
    else:
        if len(digits) == 13 and digits.startswith("86"):
            digits = digits[2:]
    return digits if _MOBILE.match(digits) else None


def normalise_sex(sex: str | None) -> str | None:
    """M, F or U from HL7 (M/F/U/O/A/N), GB/T 2261.1 (1/2/0/9), English or Chinese; or None."""
    if sex is None or not sex.strip():
        return None
    return _SEX_CODES.get(sex.strip().casefold(), "U")


def normalise_birth_date(value: date | datetime | int | str | None) -> date | None:
    """A birth date from a date, Avro int days, ISO ``YYYY-MM-DD`` or HL7 ``YYYYMMDD``, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            if re.match(r"^\d{8}", text):
                return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
            return date.fromisoformat(text[:10])
        except ValueError:
            return None
    return as_date(value)


# --- identity observations (tokens only) ------------------------------------------------


#: Bigram bit masks a tokeniser keeps (pinyin and Latin names use a few thousand bigrams).
_MAX_CACHED_BIGRAMS: Final = 50_000


def _bloom_bigrams(name: NormalisedName) -> set[str]:
    # Bigrams of each padded part separately, so "Given Family" written in either order
    # encodes identically; only the exact name_token keeps the order.
    bigrams: set[str] = set()
    for part in (name.family, name.given):
        if part:
            padded = f"_{part}_"
            bigrams.update(padded[i : i + 2] for i in range(len(padded) - 1))
    return bigrams


class IdentityTokeniser:
    """Turns clear demographics into an identity observation of keyed tokens for the MPI.

    Runs in the normalise stage, the only place demographics are in clear. Every token is
    HMAC-SHA256 under the key with a purpose label, so a national ID token can never equal
    a phone token, and nothing can be recovered without the key. The same key must be used
    by every normalise worker, or the same person gets different tokens.
    """

    __slots__ = ("_bigram_masks", "_bloom", "_tokens")

    def __init__(self, key: bytes) -> None:
        secret = _checked_key(key)
        self._tokens = hmac.new(secret, digestmod=hashlib.sha256)
        self._bloom = hmac.new(secret, digestmod=hashlib.sha512)
        self._bigram_masks: dict[str, int] = {}

    def _token(self, purpose: bytes, value: str) -> str:
        mac = self._tokens.copy()
        mac.update(_frame(b"medstream.mpi.token.v1", purpose, value.encode()))
        return mac.hexdigest()[:PSEUDONYM_HEX_CHARS]

    def name_bloom(self, name: NormalisedName) -> str:
        """The keyed bigram Bloom filter of a name, as hex (Schnell et al. 2009).

        Each bigram sets NAME_BLOOM_HASHES bits whose positions are 2-byte slices of its
        HMAC-SHA512 (independent keyed hashes, not double hashing, which eases attacks).
        A bigram's bits depend only on the key, so they are computed once per bigram.
        """
        bits = 0
        for bigram in _bloom_bigrams(name):
            mask = self._bigram_masks.get(bigram)
            if mask is None:
                mac = self._bloom.copy()
                mac.update(_frame(b"medstream.mpi.name_bloom.v1", bigram.encode()))
                digest = mac.digest()
                mask = 0
                for i in range(NAME_BLOOM_HASHES):
                    position = int.from_bytes(digest[2 * i : 2 * i + 2], "big")
                    mask |= 1 << (position % NAME_BLOOM_BITS)
                if len(self._bigram_masks) < _MAX_CACHED_BIGRAMS:
                    self._bigram_masks[bigram] = mask
            bits |= mask
        return bits.to_bytes(NAME_BLOOM_BITS // 8, "big").hex()

    def observation(
        self,
        record_key: str,
        organisation_id: str,
        event_id: str,
        event_time_ms: int | datetime,
        national_id: str | None,
        name: str | None,
        birth_date: date | datetime | int | str | None,
        sex: str | None,
        phone: str | None,
    ) -> dict[str, Any]:
        """The identity observation of one record's demographics: tokens, birth date and sex only.

        A missing birth date or sex is taken from a valid national ID (digits 7-14 are the
        birth date, the 17th is odd for men), which is what the ID encodes by definition.
        """
        nid_token: str | None = None
        if national_id is None or not national_id.strip():
            nid_status = "absent"
        elif is_valid_national_id(national_id):
            nid_status = "valid"
            nid = _normalised_nid(national_id)
            nid_token = self._token(b"national_id", nid)
            birth_date = birth_date if birth_date is not None else _nid_birth_date(nid)
            sex = sex if normalise_sex(sex) in ("M", "F") else ("M" if int(nid[16]) % 2 else "F")
        else:
            nid_status = "invalid"
        normalised_name = normalise_name(name)
        born = normalise_birth_date(birth_date)
        mobile = normalise_mobile(phone)
        return {
            "record_key": record_key,
            "organisation_id": organisation_id,
            "event_id": event_id,
            "event_time_ms": epoch_ms(event_time_ms),
            "nid_token": nid_token,
            "nid_status": nid_status,
            "name_token": (
                None if normalised_name is None else self._token(b"name", normalised_name.text)
            ),
            "name_bloom": None if normalised_name is None else self.name_bloom(normalised_name),
            "birth_date": None if born is None else born.isoformat(),
            "sex": normalise_sex(sex),
            "phone_token": None if mobile is None else self._token(b"mobile", mobile),
        }


def dice_similarity(bloom_a: str, bloom_b: str) -> float:
    """Dice coefficient 2|A&B| / (|A|+|B|) of two hex Bloom filters (0.0 when both are empty)."""
    a, b = int(bloom_a, 16), int(bloom_b, 16)
    total = a.bit_count() + b.bit_count()
    return 0.0 if total == 0 else 2 * (a & b).bit_count() / total


# --- rules ------------------------------------------------------------------------------


class MpiRulesError(ValueError):
    """The MPI rules file is missing, not YAML, or not of the expected shape."""


class IdentityObservationError(ValueError):
    """An identity observation lacks a required field or holds a value of the wrong shape."""


#: Agreement levels of each compared field, in the order the explanation lists them.
FIELD_LEVELS: Final[dict[str, tuple[str, ...]]] = {
    "name": ("agree", "partial", "disagree"),
    "birth_date": ("exact", "partial", "disagree"),
    "sex": ("agree", "disagree"),
    "phone": ("agree", "disagree"),
}


@dataclass(frozen=True, slots=True)
class MpiRules:
    """A loaded MPI rules version: thresholds, name Dice bands, block cap and log2(m/u) weights."""

    version: str
    link_threshold: float
    review_threshold: float
    name_agree_dice: float
    name_partial_dice: float
    block_cap: int
    weights: dict[str, dict[str, float]]


class _Probabilities(StrictModel):
    m: float
    u: float

    @field_validator("m", "u")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError("must be a probability strictly between 0 and 1")
        return value


class _NameLevels(StrictModel):
    agree: _Probabilities
    partial: _Probabilities
    disagree: _Probabilities


class _BirthDateLevels(StrictModel):
    exact: _Probabilities
    partial: _Probabilities
    disagree: _Probabilities


class _BinaryLevels(StrictModel):
    agree: _Probabilities
    disagree: _Probabilities


class _Fields(StrictModel):
    name: _NameLevels
    birth_date: _BirthDateLevels
    sex: _BinaryLevels
    phone: _BinaryLevels


class _Thresholds(StrictModel):
    link: float
    review: float

    @model_validator(mode="after")
    def _ordered(self) -> _Thresholds:
        if not (math.isfinite(self.link) and math.isfinite(self.review)):
            raise ValueError("thresholds must be finite numbers")
        if self.review >= self.link:
            raise ValueError("review must be below link")
        return self


class _NameDice(StrictModel):
    agree: float
    partial: float

    @model_validator(mode="after")
    def _ordered(self) -> _NameDice:
        if not 0.0 < self.partial < self.agree <= 1.0:
            raise ValueError("need 0 < partial < agree <= 1")
        return self


class _RulesModel(StrictModel):
    version: NonBlank
    thresholds: _Thresholds
    name_dice: _NameDice
    block_cap: int
    fields: _Fields

    @field_validator("block_cap")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


def mpi_rules_from_dict(document: Any, source: str = "<dict>") -> MpiRules:
    """Validate a parsed MPI rules document and turn each level's m/u into log2(m/u)."""
    model = validate_rules(_RulesModel, document, MpiRulesError, "MPI rules", source)
    weights: dict[str, dict[str, float]] = {}
    for field_name, levels in FIELD_LEVELS.items():
        field_model = getattr(model.fields, field_name)
        weights[field_name] = {}
        for level in levels:
            probabilities: _Probabilities = getattr(field_model, level)
            weights[field_name][level] = math.log2(probabilities.m / probabilities.u)
    return MpiRules(
        version=model.version,
        link_threshold=model.thresholds.link,
        review_threshold=model.thresholds.review,
        name_agree_dice=model.name_dice.agree,
        name_partial_dice=model.name_dice.partial,
        block_cap=model.block_cap,
        weights=weights,
    )


def load_mpi_rules(path: Path | str = DEFAULT_MPI_RULES_PATH) -> MpiRules:
    """Read and validate an MPI rules YAML file; raises MpiRulesError."""
    path = Path(path)
    document = read_rules_document(path, MpiRulesError, "MPI rules")
    return mpi_rules_from_dict(document, str(path))


# --- comparison -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    """The Fellegi-Sunter comparison of two records: total weight and per-field reasons."""

    score: float
    fields: tuple[str, ...]  # e.g. "name agree (Dice 0.93) +7.49"

    def explain(self, threshold_name: str, threshold: float) -> str:
        """Per-field levels and weights and the total against a threshold, without identifiers."""
        relation = ">=" if self.score >= threshold else "<"
        return (
            f"{'; '.join(self.fields)}; total {self.score:+.2f} {relation} "
            f"{threshold_name} threshold {threshold:.2f}"
        )


def _birth_date_level(a: str, b: str) -> str:
    if a == b:
        return "exact"
    first, second = date.fromisoformat(a), date.fromisoformat(b)
    if first.year == second.year and (first.month, first.day) == (second.day, second.month):
        return "partial"
    differing = sum(
        x != y
        for x, y in (
            (first.year, second.year),
            (first.month, second.month),
            (first.day, second.day),
        )
    )
    return "partial" if differing == 1 else "disagree"


def compare_features(a: dict[str, Any], b: dict[str, Any], rules: MpiRules) -> Comparison:
    """Compare two records' features field by field; a field missing on either side weighs 0."""
    total = 0.0
    reasons: list[str] = []

    def add(field_name: str, level: str | None, detail: str = "") -> None:
        nonlocal total
        if level is None:
            reasons.append(f"{field_name} missing +0.00")
            return
        weight = rules.weights[field_name][level]
        total += weight
        reasons.append(f"{field_name} {level}{detail} {weight:+.2f}")

    if a.get("name_bloom") and b.get("name_bloom"):
        dice = dice_similarity(a["name_bloom"], b["name_bloom"])
        if dice >= rules.name_agree_dice:
            level = "agree"
        elif dice >= rules.name_partial_dice:
            level = "partial"
        else:
            level = "disagree"
        add("name", level, f" (Dice {dice:.2f})")
    else:
        add("name", None)
    if a.get("birth_date") and b.get("birth_date"):
        add("birth_date", _birth_date_level(a["birth_date"], b["birth_date"]))
    else:
        add("birth_date", None)
    sexes = (a.get("sex"), b.get("sex"))
    if all(sex in ("M", "F") for sex in sexes):
        add("sex", "agree" if sexes[0] == sexes[1] else "disagree")
    else:
        add("sex", None)
    if a.get("phone") and b.get("phone"):
        add("phone", "agree" if a["phone"] == b["phone"] else "disagree")
    else:
        add("phone", None)
    return Comparison(round(total, 6), tuple(reasons))


# --- link events and the index ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """One MPI decision about one record, from ``effective_time_ms`` on.

    ``action``: link (a record joins a person), merge (moved because its person was merged
    into ``person_key``), unmerge (split out of ``previous_person_key``), review (a possible
    match for a steward; membership unchanged, ``person_key`` is the candidate person).
    ``explanation`` holds agreement levels, weights and pseudonymous keys only.
    """

    link_event_id: str
    action: str
    record_key: str
    person_key: str
    previous_person_key: str | None
    method: str
    score: float | None
    threshold: float | None
    explanation: str
    effective_time_ms: int
    triggering_event_id: str
    organisation_id: str
    decided_time_ms: int
    rules_version: str


def link_event_id(
    action: str,
    record_key: str,
    person_key: str,
    previous_person_key: str | None,
    triggering_event_id: str,
) -> str:
    """The deterministic id of a decision: a redelivered observation yields the same id."""
    text = "|".join(
        (action, record_key, person_key, previous_person_key or "", triggering_event_id)
    )
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def membership_at(events: Iterable[LinkEvent], at_ms: int) -> dict[str, str]:
    """Record key -> person key as of ``at_ms``: each record's last non-review event up to then.

    Ties on effective time go to the event that comes later in ``events`` (the index never
    emits ties for one record: it keeps each record's effective times strictly increasing).
    """
    latest: dict[str, tuple[int, str]] = {}
    for event in events:
        if event.action == "review" or event.effective_time_ms > at_ms:
            continue
        known = latest.get(event.record_key)
        if known is None or event.effective_time_ms >= known[0]:
            latest[event.record_key] = (event.effective_time_ms, event.person_key)
    return {record_key: person for record_key, (_, person) in latest.items()}


def _observation_features(observation: dict[str, Any]) -> tuple[dict[str, Any], int]:
    for required in ("record_key", "organisation_id", "event_id"):
        value = observation.get(required)
        if not isinstance(value, str) or not value.strip():
            raise IdentityObservationError(
                f"identity observation: {required} must be a non-empty string"
            )
    status = observation.get("nid_status", "absent")
    if status not in NID_STATUSES:
        raise IdentityObservationError(
            f"identity observation: nid_status must be one of {', '.join(NID_STATUSES)}"
        )
    raw_time = observation.get("event_time_ms", observation.get("event_time"))
    if raw_time is None:
        raise IdentityObservationError("identity observation: event_time_ms is missing")
    born = normalise_birth_date(observation.get("birth_date"))
    sex = observation.get("sex")
    features = {
        # Only a valid national ID is evidence; an invalid one is ignored like an absent one.
        "nid": observation.get("nid_token") if status == "valid" else None,
        "name_token": observation.get("name_token"),
        "name_bloom": observation.get("name_bloom"),
        "birth_date": None if born is None else born.isoformat(),
        # U says nothing about the person: it never overwrites a known M or F.
        "sex": sex if sex in ("M", "F") else None,
        "phone": observation.get("phone_token"),
    }
    return features, epoch_ms(raw_time)


def _merged_features(old: dict[str, Any], new: dict[str, Any], newer: bool) -> dict[str, Any]:
    # Absence is not evidence (a lab message without a phone keeps the known phone); a
    # late, older observation only fills gaps and never overwrites newer demographics.
    merged = dict(old)
    for name, value in new.items():
        if value is not None and (newer or merged.get(name) is None):
            merged[name] = value
    return merged


def _transposed(birth_date: str) -> str | None:
    born = date.fromisoformat(birth_date)
    try:
        swapped = date(born.year, born.day, born.month)
    except ValueError:
        return None
    return None if swapped == born else swapped.isoformat()


@dataclass(frozen=True, slots=True)
class _Candidate:
    person_key: str
    comparison: Comparison


class PatientIndex:
    """The master patient index: assigns each record to a person and reports every change.

    State (JSON values, all keys prefixed):

    - ``mpi.record|<record_key>``: person, organisation, merged features, last event time,
      last effective time, pinned (split by a steward: never moved automatically again);
    - ``mpi.person|<person_key>``: members, nid (token), manual; a merged person stays as a
      tombstone with ``merged_into`` so its key is never handed out again;
    - ``mpi.nid|<token>``: the person of a national ID token;
    - ``mpi.block|<birth_date>`` and ``mpi.phone|<token>``: candidate record keys, at most
      ``block_cap`` each, newest last (older ones drop out: see mpi.yaml).

    Records, persons and ID entries are the index itself and grow with the population
    (one entry per record, person and ID); only the blocks are capped.

    Event time: a record's demographics follow its newest observation; a late observation
    (older than the newest applied) only fills missing fields. Each record's link events get
    strictly increasing effective times (at least the triggering event time, else the last
    one + 1 ms), so :func:`membership_at` is unambiguous however late the evidence arrives.
    """

    __slots__ = ("_base", "rules")

    def __init__(self, rules: MpiRules, key: bytes) -> None:
        self.rules = rules
        self._base = hmac.new(_checked_key(key), digestmod=hashlib.sha256)

    # --- public API -----------------------------------------------------------------

    def observe(
        self, observation: dict[str, Any], state: KeyValueState, now_ms: int
    ) -> list[LinkEvent]:
        """Apply one identity observation; the decisions it caused ([] when nothing changed)."""
        features, event_time_ms = _observation_features(observation)
        context = _Context(
            record_key=observation["record_key"],
            organisation_id=observation["organisation_id"],
            event_id=observation["event_id"],
            event_time_ms=event_time_ms,
            now_ms=now_ms,
        )
        record = state.get(_record_key(context.record_key))
        if record is None:
            return self._new_record(context, features, state)
        return self._known_record(context, record, features, state)

    def unmerge(
        self, record_key: str, state: KeyValueState, now_ms: int, reason: str
    ) -> list[LinkEvent]:
        """A data steward's split: the record leaves its person for a new person of its own.

        The record is pinned: no later automatic decision moves it (contradicting evidence
        raises a review instead). ``reason`` goes into the explanation verbatim, so it must
        not hold identifiers. A record that is already alone in its person is only pinned.
        """
        record = state.get(_record_key(record_key))
        if record is None:
            raise KeyError(f"record {record_key} is not in the patient index")
        record["pinned"] = True
        old_person_key = record["person"]
        old_person = self._person(state, old_person_key)
        if old_person["members"] == [record_key]:
            state.put(_record_key(record_key), record)
            return []
        trigger = "manual:" + hashlib.blake2b(
            f"{record_key}|{now_ms}|{reason}".encode(), digest_size=16
        ).hexdigest()
        context = _Context(record_key, record["organisation"], trigger, now_ms, now_ms)
        new_person_key = self._allocate_person_key(state, "record", record_key)
        old_person["members"].remove(record_key)
        state.put(_person_key(old_person_key), old_person)
        # The new person carries the record's ID (if any) without owning it in the ID index,
        # so it never attracts that ID's other records and is never merged back by it.
        new_person = {"members": [record_key], "nid": record["features"].get("nid"),
                      "manual": True, "merged_into": None}
        state.put(_person_key(new_person_key), new_person)
        event = self._move(
            context, record, "unmerge", new_person_key, "manual", None, None,
            f"manual split by a data steward from person {old_person_key}: {reason}",
        )
        state.put(_record_key(record_key), record)
        return [event]

    # --- new records ----------------------------------------------------------------

    def _new_record(
        self, context: _Context, features: dict[str, Any], state: KeyValueState
    ) -> list[LinkEvent]:
        nid = features["nid"]
        record: dict[str, Any] = {
            "person": None,
            "organisation": context.organisation_id,
            "features": features,
            "time_ms": context.event_time_ms,
            "effective_ms": None,
            "pinned": False,
            "updated_ms": context.now_ms,
        }
        events: list[LinkEvent] = []
        owner = None if nid is None else state.get(_nid_key(nid))
        if owner is not None:
            self._add_member(state, owner, context.record_key)
            events.append(self._move(
                context, record, "link", owner, "national_id", None, None,
                "valid national ID token equals the person's",
            ))
        else:
            candidates = self._candidates(context.record_key, features, state)
            linked = [c for c in candidates if c.comparison.score >= self.rules.link_threshold]
            if len(linked) == 1:
                best = linked[0]
                self._add_member(state, best.person_key, context.record_key)
                if nid is not None:
                    self._claim_nid(state, best.person_key, nid)
                events.append(self._move(
                    context, record, "link", best.person_key, "probabilistic",
                    best.comparison.score, self.rules.link_threshold,
                    best.comparison.explain("link", self.rules.link_threshold),
                ))
            else:
                person_key = self._found_person(state, context.record_key, nid)
                method = "organisation_mrn" if nid is None else "national_id"
                explanation = (
                    "new person founded by this record"
                    + ("" if nid is None else " and its valid national ID token")
                    + f"; {len(candidates)} candidate person(s) scored"
                )
                events.append(self._move(
                    context, record, "link", person_key, method, None, None, explanation,
                ))
                reviewed = linked if len(linked) > 1 else candidates[:1]
                for candidate in reviewed:
                    if candidate.comparison.score < self.rules.review_threshold:
                        continue
                    note = (
                        f"; {len(linked)} persons reach the link threshold, so none is linked"
                        if len(linked) > 1
                        else ""
                    )
                    events.append(self._review(
                        context, person_key, candidate.person_key, candidate.comparison.score,
                        candidate.comparison.explain("review", self.rules.review_threshold)
                        + note,
                    ))
        self._index_blocks(state, context.record_key, None, features)
        state.put(_record_key(context.record_key), record)
        return events

    def _candidates(
        self, record_key: str, features: dict[str, Any], state: KeyValueState
    ) -> list[_Candidate]:
        """The best comparison per candidate person, best first; never a person of another ID."""
        blocks: list[str] = []
        if features["birth_date"]:
            blocks.append(_block_key(features["birth_date"]))
            transposed = _transposed(features["birth_date"])
            if transposed is not None:
                blocks.append(_block_key(transposed))
        if features["phone"]:
            blocks.append(_phone_key(features["phone"]))
        record_keys = sorted(
            {other for block in blocks for other in state.get(block) or [] if other != record_key}
        )
        nid = features["nid"]
        best: dict[str, Comparison] = {}
        for other_key in record_keys:
            other = state.get(_record_key(other_key))
            if other is None:
                continue
            person_key = other["person"]
            person = self._person(state, person_key)
            other_nids = (person.get("nid"), other["features"].get("nid"))
            if nid is not None and any(other_nid not in (None, nid) for other_nid in other_nids):
                continue  # two different valid national IDs are two people, whatever else agrees
            comparison = compare_features(features, other["features"], self.rules)
            if person_key not in best or comparison.score > best[person_key].score:
                best[person_key] = comparison
        ranked = sorted(best.items(), key=lambda item: (-item[1].score, item[0]))
        return [_Candidate(person_key, comparison) for person_key, comparison in ranked]

    # --- known records --------------------------------------------------------------

    def _known_record(
        self,
        context: _Context,
        record: dict[str, Any],
        features: dict[str, Any],
        state: KeyValueState,
    ) -> list[LinkEvent]:
        old_features = record["features"]
        newer = context.event_time_ms >= record["time_ms"]
        merged = _merged_features(old_features, features, newer)
        if merged == old_features:
            return []  # a redelivery or a repeat of known demographics
        record["features"] = merged
        record["time_ms"] = max(record["time_ms"], context.event_time_ms)
        record["updated_ms"] = context.now_ms
        self._index_blocks(state, context.record_key, old_features, merged)
        state.put(_record_key(context.record_key), record)
        # Demographic updates without new ID evidence never move a known record: only an ID
        # or a steward does, so a record cannot oscillate between persons.
        if merged["nid"] is None or merged["nid"] == old_features["nid"]:
            return []
        return self._national_id_evidence(context, merged["nid"], state)

    def _national_id_evidence(
        self, context: _Context, nid: str, state: KeyValueState
    ) -> list[LinkEvent]:
        """Apply a record's new valid national ID: claim it, merge, or split the record out."""
        record: dict[str, Any] = state.get(_record_key(context.record_key)) or {}
        person_key = record["person"]
        person = self._person(state, person_key)
        if person["nid"] == nid:
            return []
        owner: str | None = state.get(_nid_key(nid))
        alone = person["members"] == [context.record_key]
        if owner is None and (person["nid"] is None or alone):
            # The person's first ID, or the sole record's corrected ID: the person takes it.
            if person["nid"] is not None and state.get(_nid_key(person["nid"])) == person_key:
                state.delete(_nid_key(person["nid"]))
            self._claim_nid(state, person_key, nid)
            return []
        if any((state.get(_record_key(m)) or {}).get("pinned") for m in person["members"]):
            return [self._review(
                context, person_key, owner or person_key, None,
                "new national ID evidence contradicts a data steward's split; nothing moved",
            )]
        if owner is not None and (person["nid"] is None or alone):
            return self._merge(context, person_key, owner, state)
        # The record's ID contradicts its person's: split it out to the ID's person or a new one.
        person["members"].remove(context.record_key)
        state.put(_person_key(person_key), person)
        if owner is not None:
            target = owner
            self._add_member(state, owner, context.record_key)
        else:
            target = self._found_person(state, context.record_key, nid)
        event = self._move(
            context, record, "unmerge", target, "national_id", None, None,
            f"record's valid national ID token differs from person {person_key}'s; "
            + ("moved to the person of its ID" if owner else "moved to a new person of its ID"),
        )
        state.put(_record_key(context.record_key), record)
        return [event]

    def _merge(
        self, context: _Context, source_key: str, target_key: str, state: KeyValueState
    ) -> list[LinkEvent]:
        """Merge person ``source_key`` into ``target_key``: one merge event per moved record."""
        source = self._person(state, source_key)
        target = self._person(state, target_key)
        if source["nid"] is not None and state.get(_nid_key(source["nid"])) == source_key:
            state.delete(_nid_key(source["nid"]))
        explanation = (
            f"a record of person {source_key} carries the valid national ID token of person "
            f"{target_key}; {len(source['members'])} record(s) merged"
        )
        events: list[LinkEvent] = []
        for member in source["members"]:
            member_record = state.get(_record_key(member))
            if member_record is None:
                continue
            member_context = _Context(
                member, member_record["organisation"], context.event_id,
                context.event_time_ms, context.now_ms,
            )
            events.append(self._move(
                member_context, member_record, "merge", target_key, "national_id", None, None,
                explanation,
            ))
            state.put(_record_key(member), member_record)
            if member not in target["members"]:
                target["members"].append(member)
        state.put(_person_key(target_key), target)
        state.put(_person_key(source_key), {
            "members": [], "nid": None, "manual": False, "merged_into": target_key,
        })
        return events

    # --- helpers --------------------------------------------------------------------

    def _person(self, state: KeyValueState, person_key: str) -> dict[str, Any]:
        person = state.get(_person_key(person_key))
        if person is None:
            raise KeyError(f"person {person_key} is missing from the patient index state")
        return dict(person, members=list(person["members"]))

    def _allocate_person_key(self, state: KeyValueState, kind: str, basis: str) -> str:
        # From the ID token or the founding record; a generation counter skips keys already
        # used (a split record whose old person was founded by it, an ID re-pointed away).
        generation = 0
        while True:
            mac = self._base.copy()
            mac.update(_frame(
                b"medstream.mpi.person_key.v1", kind.encode(), basis.encode(),
                str(generation).encode(),
            ))
            person_key = mac.hexdigest()[:PSEUDONYM_HEX_CHARS]
            if state.get(_person_key(person_key)) is None:
                return person_key
            generation += 1

    def _found_person(self, state: KeyValueState, record_key: str, nid: str | None) -> str:
        """A new person with one record, keyed from its ID token if any, else from the record."""
        if nid is not None:
            person_key = self._allocate_person_key(state, "nid", nid)
            state.put(_nid_key(nid), person_key)
        else:
            person_key = self._allocate_person_key(state, "record", record_key)
        state.put(_person_key(person_key), {
            "members": [record_key], "nid": nid, "manual": False, "merged_into": None,
        })
        return person_key

    def _add_member(self, state: KeyValueState, person_key: str, record_key: str) -> None:
        person = self._person(state, person_key)
        if record_key not in person["members"]:
            person["members"].append(record_key)
        state.put(_person_key(person_key), person)

    def _claim_nid(self, state: KeyValueState, person_key: str, nid: str) -> None:
        person = self._person(state, person_key)
        if person["nid"] is None or person["nid"] != nid:
            person["nid"] = nid
            state.put(_person_key(person_key), person)
        state.put(_nid_key(nid), person_key)

    def _index_blocks(
        self,
        state: KeyValueState,
        record_key: str,
        old: dict[str, Any] | None,
        new: dict[str, Any],
    ) -> None:
        for field_name, key_of in (("birth_date", _block_key), ("phone", _phone_key)):
            before = None if old is None else old.get(field_name)
            after = new.get(field_name)
            if before is not None and before != after:
                members = [m for m in state.get(key_of(before)) or [] if m != record_key]
                if members:
                    state.put(key_of(before), members)
                else:
                    state.delete(key_of(before))
            if after is not None:
                members = [m for m in state.get(key_of(after)) or [] if m != record_key]
                members.append(record_key)
                state.put(key_of(after), members[-self.rules.block_cap :])

    def _effective_time(self, context: _Context, record: dict[str, Any]) -> int:
        last = record.get("effective_ms")
        return context.event_time_ms if last is None else max(context.event_time_ms, last + 1)

    def _move(
        self,
        context: _Context,
        record: dict[str, Any],
        action: str,
        person_key: str,
        method: str,
        score: float | None,
        threshold: float | None,
        explanation: str,
    ) -> LinkEvent:
        """Set the record's person and return the decision (the caller stores the record)."""
        previous = record.get("person")
        effective = self._effective_time(context, record)
        record["person"] = person_key
        record["effective_ms"] = effective
        return self._event(
            context, action, person_key, previous, method, score, threshold, explanation, effective
        )

    def _review(
        self,
        context: _Context,
        current_person_key: str,
        candidate_person_key: str,
        score: float | None,
        explanation: str,
    ) -> LinkEvent:
        return self._event(
            context, "review", candidate_person_key, current_person_key,
            "probabilistic" if score is not None else "national_id", score,
            None if score is None else self.rules.review_threshold, explanation,
            context.event_time_ms,
        )

    def _event(
        self,
        context: _Context,
        action: str,
        person_key: str,
        previous: str | None,
        method: str,
        score: float | None,
        threshold: float | None,
        explanation: str,
        effective_time_ms: int,
    ) -> LinkEvent:
        return LinkEvent(
            link_event_id=link_event_id(
                action, context.record_key, person_key, previous, context.event_id
            ),
            action=action,
            record_key=context.record_key,
            person_key=person_key,
            previous_person_key=previous,
            method=method,
            score=score,
            threshold=threshold,
            explanation=explanation,
            effective_time_ms=effective_time_ms,
            triggering_event_id=context.event_id,
            organisation_id=context.organisation_id,
            decided_time_ms=context.now_ms,
            rules_version=self.rules.version,
        )


@dataclass(slots=True)
class _Context:
    """The observation being applied: whose record, which event, when."""

    record_key: str
    organisation_id: str
    event_id: str
    event_time_ms: int
    now_ms: int


def _record_key(record_key: str) -> str:
    return f"mpi.record|{record_key}"


def _person_key(person_key: str) -> str:
    return f"mpi.person|{person_key}"


def _nid_key(nid_token: str) -> str:
    return f"mpi.nid|{nid_token}"


def _block_key(birth_date: str) -> str:
    return f"mpi.block|{birth_date}"


def _phone_key(phone_token: str) -> str:
    return f"mpi.phone|{phone_token}"
