"""Master patient index: ID check digits, tokens, linking, merge, unmerge, point-in-time history.

All identifiers are synthetic: national IDs use the fictional area code 990101 (no such
administrative division exists) and phone numbers are invented.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import date
from typing import Any

import pytest

from streams.findings import DictState
from streams.mpi import (
    DEFAULT_MPI_RULES_PATH,
    IdentityObservationError,
    IdentityTokeniser,
    LinkEvent,
    MpiRules,
    MpiRulesError,
    NormalisedName,
    PatientIndex,
    dice_similarity,
    is_valid_national_id,
    load_mpi_rules,
    membership_at,
    mpi_rules_from_dict,
    national_id_check_digit,
    normalise_mobile,
    normalise_name,
)

TOKEN_KEY = b"test-only-identity-token-key-0123"
INDEX_KEY = b"test-only-mpi-person-key-456789ab"
T0 = 1_793_700_000_000
MINUTE = 60_000


def synthetic_nid(birth: str, sequence: str = "123") -> str:
    """A well-formed ID of the fictional area 990101 with a correct check digit."""
    first17 = f"990101{birth}{sequence}"
    return first17 + national_id_check_digit(first17)


NID_A = synthetic_nid("19800115", "121")  # odd 17th digit: male
NID_B = synthetic_nid("19800115", "342")  # even: female
NID_C = synthetic_nid("19751203", "561")


@pytest.fixture(scope="module")
def rules() -> MpiRules:
    return load_mpi_rules()


@pytest.fixture(scope="module")
def tokeniser() -> IdentityTokeniser:
    return IdentityTokeniser(TOKEN_KEY)


@pytest.fixture
def index(rules: MpiRules) -> PatientIndex:
    return PatientIndex(rules, INDEX_KEY)


@pytest.fixture
def state() -> DictState:
    return DictState()


def observe(
    index: PatientIndex,
    tokeniser: IdentityTokeniser,
    state: DictState,
    record: str,
    event: str,
    time_ms: int,
    *,
    organisation: str = "H001",
    nid: str | None = None,
    name: str | None = "张伟",
    birth: str | None = "1980-01-15",
    sex: str | None = "M",
    phone: str | None = "13800138000",
) -> list[LinkEvent]:
    observation = tokeniser.observation(
        record, organisation, event, time_ms, nid, name, birth, sex, phone
    )
    return index.observe(observation, state, now_ms=time_ms + 5)


def person_of(state: DictState, record: str) -> str:
    return str(state.values[f"mpi.record|{record}"]["person"])


# --- national ID ------------------------------------------------------------------------


def test_check_digit_of_the_published_example() -> None:
    # The example number printed in GB 11643-1999 (Beijing Chaoyang, born 1949-12-31, female).
    assert national_id_check_digit("11010519491231002") == "X"
    assert is_valid_national_id("11010519491231002X")
    assert is_valid_national_id(" 11010519491231002x ")  # lowercase x, outer blanks


def test_check_digit_values_follow_mod_11_2() -> None:
    # Recomputed independently with the weights tabulated in GB 11643-1999 (2^(17-i) mod 11).
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    total = sum(int(d) * w for d, w in zip("99010119800115121", weights, strict=True))
    assert national_id_check_digit("99010119800115121") == "10X98765432"[total % 11]
    with pytest.raises(ValueError, match="17"):
        national_id_check_digit("9901011980011512")
    with pytest.raises(ValueError, match="17"):
        national_id_check_digit("9901011980011512A")


@pytest.mark.parametrize(
    "text",
    [
        "11010519491231002",  # 17 characters
        "110105194912310021",  # wrong check digit
        "1101051949123100XX",  # a letter among the digits
        "A1010519491231002X",
        synthetic_nid("19490230"),  # 30 February, correct check digit
        synthetic_nid("18991231"),  # before 1900
        "",
    ],
)
def test_invalid_national_ids(text: str) -> None:
    assert not is_valid_national_id(text)


def test_future_birth_date_is_invalid() -> None:
    nid = synthetic_nid("20300101")
    assert is_valid_national_id(nid, today=date(2030, 1, 1))
    assert not is_valid_national_id(nid, today=date(2029, 12, 31))


# --- normalisation and tokens ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family", "given"),
    [
        ("张伟", "zhang", "wei"),
        ("ZHANG^WEI", "zhang", "wei"),
        ("Wei Zhang", "zhang", "wei"),
        ("Zhang, Wei", "zhang", "wei"),
        ("张小明", "zhang", "xiaoming"),
        ("ZHANG^XIAO MING^^^", "zhang", "xiaoming"),
        ("Xiao-Ming Zhang", "zhang", "xiaoming"),
        ("欧阳娜娜", "ouyang", "nana"),  # two-character family name
        ("单田芳", "shan", "tianfang"),  # family-name reading, not dan
        ("吕小红", "lu", "xiaohong"),  # lü written lu
        ("阿依古丽·买买提", "", "ayigulimaimaiti"),  # no family-first order
        ("Müller^José", "muller", "jose"),
    ],
)
def test_name_normalisation(name: str, family: str, given: str) -> None:
    assert normalise_name(name) == NormalisedName(family, given)


def test_empty_names_normalise_to_none() -> None:
    assert normalise_name(None) is None
    assert normalise_name("  ") is None
    assert normalise_name("^^") is None


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ("+86 138-0013-8000", "13800138000"),
        ("0086 13800138000", "13800138000"),
        ("8613800138000", "13800138000"),
        ("(139) 1234 5678", "13912345678"),
        ("12345678901", None),  # no mobile range starts with 12
        ("010-12345678", None),  # a landline
        ("1380013800", None),  # 10 digits
        (None, None),
    ],
)
def test_mobile_normalisation(phone: str | None, expected: str | None) -> None:
    assert normalise_mobile(phone) == expected


def test_observation_holds_tokens_only(tokeniser: IdentityTokeniser) -> None:
    observation = tokeniser.observation(
        "rk1", "H001", "ev1", T0, NID_A.lower(), "张伟", "1980-01-15", None, "+86 138 0013 8000"
    )
    assert set(observation) == {
        "record_key", "organisation_id", "event_id", "event_time_ms", "nid_token",
        "nid_status", "name_token", "name_bloom", "birth_date", "sex", "phone_token",
    }
    assert observation["nid_status"] == "valid"
    assert observation["sex"] == "M"  # from the ID's odd 17th digit
    assert observation["birth_date"] == "1980-01-15"
    assert re.fullmatch(r"[0-9a-f]{32}", observation["nid_token"])
    assert re.fullmatch(r"[0-9a-f]{128}", observation["name_bloom"])
    clear = [
        NID_A, NID_A[:17], NID_A[6:14], "张伟", "zhang", "wei", "13800138000",
        TOKEN_KEY.decode(), TOKEN_KEY.hex(),
    ]
    for value in observation.values():
        for identifier in clear:
            assert identifier not in str(value), identifier
    # Tokens are domain-separated: an ID token never equals a name or phone token.
    tokens = {observation[field] for field in ("nid_token", "name_token", "phone_token")}
    assert len(tokens) == 3


def test_observation_statuses_and_missing_values(tokeniser: IdentityTokeniser) -> None:
    invalid = tokeniser.observation(
        "rk1", "H001", "ev1", T0, NID_A[:-1] + "0", None, None, "女", "010-12345678"
    )
    assert invalid["nid_status"] == "invalid"
    assert invalid["nid_token"] is None
    assert invalid["name_token"] is None and invalid["name_bloom"] is None
    assert invalid["birth_date"] is None  # an invalid ID is not a source of birth dates
    assert invalid["sex"] == "F"
    assert invalid["phone_token"] is None
    absent = tokeniser.observation("rk1", "H001", "ev1", T0, "  ", "李娜", "19900304", "2", None)
    assert (absent["nid_status"], absent["birth_date"], absent["sex"]) == (
        "absent", "1990-03-04", "F",
    )


def test_same_name_in_han_and_pinyin_compares_as_agree(
    tokeniser: IdentityTokeniser, rules: MpiRules
) -> None:
    def bloom(name: str) -> str:
        return tokeniser.observation("r", "H", "e", T0, None, name, None, None, None)["name_bloom"]

    han, hl7, western = bloom("张小明"), bloom("ZHANG^XIAO MING"), bloom("Xiaoming Zhang")
    assert dice_similarity(han, hl7) >= rules.name_agree_dice
    assert dice_similarity(han, western) >= rules.name_agree_dice
    typo = dice_similarity(bloom("张伟"), bloom("ZHANG^WEN"))
    assert rules.name_partial_dice <= typo < rules.name_agree_dice
    assert dice_similarity(han, bloom("李娜")) < rules.name_partial_dice


def test_tokens_depend_on_the_key(tokeniser: IdentityTokeniser) -> None:
    other = IdentityTokeniser(b"another-test-only-token-key-99999")
    ours = tokeniser.observation("r", "H", "e", T0, NID_A, "张伟", None, None, "13800138000")
    theirs = other.observation("r", "H", "e", T0, NID_A, "张伟", None, None, "13800138000")
    for field in ("nid_token", "name_token", "name_bloom", "phone_token"):
        assert ours[field] != theirs[field]
    with pytest.raises(ValueError, match="at least 16 bytes"):
        IdentityTokeniser(b"short")


# --- deterministic linking --------------------------------------------------------------


def test_same_national_id_links_across_organisations(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    first = observe(index, tokeniser, state, "rk-h1", "ev1", T0, nid=NID_A)
    assert [(e.action, e.method, e.previous_person_key) for e in first] == [
        ("link", "national_id", None)
    ]
    person = first[0].person_key
    assert re.fullmatch(r"[0-9a-f]{32}", person)
    # Different name spelling, no phone, other organisation: the ID decides.
    second = observe(
        index, tokeniser, state, "rk-h2", "ev2", T0 + MINUTE,
        organisation="H002", nid=NID_A, name="Li Si", phone=None,
    )
    assert len(second) == 1
    link = second[0]
    assert (link.action, link.method, link.person_key, link.score) == (
        "link", "national_id", person, None,
    )
    assert (link.organisation_id, link.triggering_event_id) == ("H002", "ev2")
    assert link.effective_time_ms == T0 + MINUTE
    assert link.rules_version == "2026.11-1"
    nid_token = tokeniser.observation("r", "H", "e", T0, NID_A, None, None, None, None)["nid_token"]
    assert person != nid_token
    for value in dataclasses.asdict(link).values():
        assert INDEX_KEY.decode() not in str(value) and INDEX_KEY.hex() not in str(value)
    assert state.values[f"mpi.person|{person}"]["members"] == ["rk-h1", "rk-h2"]


def test_a_record_is_always_the_same_record(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0)
    person = person_of(state, "rk1")
    # Completely different demographics later: the record stays where it is.
    changed = observe(
        index, tokeniser, state, "rk1", "ev2", T0 + MINUTE,
        name="王芳", birth="1991-07-07", sex="F", phone="13912345678",
    )
    assert changed == []
    assert person_of(state, "rk1") == person
    assert state.values["mpi.block|1991-07-07"] == ["rk1"]
    assert "mpi.block|1980-01-15" not in state.values  # left its old block


# --- probabilistic linking --------------------------------------------------------------


def test_probabilistic_link_with_explanation(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState, rules: MpiRules
) -> None:
    observe(index, tokeniser, state, "rk-h1", "ev1", T0, name="张伟")
    events = observe(
        index, tokeniser, state, "rk-h2", "ev2", T0 + MINUTE,
        organisation="H002", name="ZHANG^WEI", phone="+86 138-0013-8000",
    )
    assert len(events) == 1
    link = events[0]
    weights = rules.weights
    expected = (
        weights["name"]["agree"] + weights["birth_date"]["exact"] + weights["sex"]["agree"]
        + weights["phone"]["agree"]
    )
    assert (link.action, link.method) == ("link", "probabilistic")
    assert link.person_key == person_of(state, "rk-h1")
    assert link.score == pytest.approx(expected, abs=1e-6)
    assert link.threshold == rules.link_threshold == 14.0
    assert "name agree (Dice 1.00) +7.49" in link.explanation
    assert "birth_date exact +8.31" in link.explanation
    assert "sex agree +0.97" in link.explanation
    assert "phone agree +5.91" in link.explanation
    assert f"total {expected:+.2f} >= link threshold 14.00" in link.explanation
    for identifier in ("张伟", "zhang", "13800138000", "1980"):
        assert identifier not in link.explanation


def test_missing_fields_weigh_nothing(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0, sex=None, phone=None)
    events = observe(index, tokeniser, state, "rk2", "ev2", T0 + 1, phone=None)
    assert events[0].method == "probabilistic"
    assert "sex missing +0.00" in events[0].explanation
    assert "phone missing +0.00" in events[0].explanation
    assert events[0].score == pytest.approx(15.798675, abs=1e-5)  # 7.49 + 8.31


def test_review_band_flags_without_linking(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState, rules: MpiRules
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0, birth="1980-01-05", phone=None)
    # Day and month transposed (1980-05-01), found through the transposed birth date block.
    events = observe(
        index, tokeniser, state, "rk2", "ev2", T0 + MINUTE, birth="1980-05-01", phone=None
    )
    assert [e.action for e in events] == ["link", "review"]
    link, review = events
    assert link.method == "organisation_mrn"
    assert link.person_key != person_of(state, "rk1")
    assert review.person_key == person_of(state, "rk1")
    assert review.previous_person_key == link.person_key == person_of(state, "rk2")
    expected = (
        rules.weights["name"]["agree"] + rules.weights["birth_date"]["partial"]
        + rules.weights["sex"]["agree"]
    )
    assert review.score == pytest.approx(expected, abs=1e-6)
    assert rules.review_threshold <= expected < rules.link_threshold
    assert review.threshold == rules.review_threshold
    assert "birth_date partial +2.58" in review.explanation
    assert "review threshold 8.00" in review.explanation
    assert membership_at(events, T0 + MINUTE) == {"rk2": link.person_key}


def test_below_review_threshold_founds_a_person_silently(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0)
    # Same birth date and sex, another name and phone: 8.31 + 0.97 - 5.01 - 1.31 < 8.
    events = observe(
        index, tokeniser, state, "rk2", "ev2", T0 + 1, name="李娜", phone="13912345678"
    )
    assert [(e.action, e.method) for e in events] == [("link", "organisation_mrn")]
    assert "1 candidate person(s) scored" in events[0].explanation


def test_different_national_ids_are_never_linked(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0, nid=NID_A)
    # Every other field agrees (twins sharing a phone, say), but the IDs differ.
    twin = synthetic_nid("19800115", "131")
    events = observe(index, tokeniser, state, "rk2", "ev2", T0 + 1, nid=twin)
    assert [(e.action, e.method) for e in events] == [("link", "national_id")]
    assert events[0].person_key != person_of(state, "rk1")
    assert "0 candidate person(s) scored" in events[0].explanation


def test_a_valid_id_joins_a_probabilistic_match_without_an_id(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0)
    events = observe(index, tokeniser, state, "rk2", "ev2", T0 + 1, nid=NID_A)
    person = person_of(state, "rk1")
    assert (events[0].method, events[0].person_key) == ("probabilistic", person)
    # The person now owns the ID: a third record with it links deterministically.
    third = observe(index, tokeniser, state, "rk3", "ev3", T0 + 2, nid=NID_A, name="X Y")
    assert (third[0].method, third[0].person_key) == ("national_id", person)


# --- merge and unmerge ------------------------------------------------------------------


def build_merge(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> tuple[list[LinkEvent], str, str]:
    """P = {rk1, rk2} linked probabilistically without an ID; Q = {rk3} with NID_A; then rk2
    shows NID_A, so P is merged into Q."""
    history = observe(index, tokeniser, state, "rk1", "ev1", T0)
    history += observe(index, tokeniser, state, "rk2", "ev2", T0 + MINUTE, organisation="H002")
    history += observe(
        index, tokeniser, state, "rk3", "ev3", T0 + 2 * MINUTE,
        organisation="H003", nid=NID_A, name="赵六", birth="1980-01-15", phone=None,
    )
    person_p, person_q = person_of(state, "rk1"), person_of(state, "rk3")
    assert person_p == person_of(state, "rk2") != person_q
    merge = observe(
        index, tokeniser, state, "rk2", "ev4", T0 + 10 * MINUTE, organisation="H002", nid=NID_A
    )
    return history + merge, person_p, person_q


def test_merge_moves_every_record_of_the_person(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    history, person_p, person_q = build_merge(index, tokeniser, state)
    merges = [e for e in history if e.action == "merge"]
    assert [(e.record_key, e.person_key, e.previous_person_key, e.method) for e in merges] == [
        ("rk1", person_q, person_p, "national_id"),
        ("rk2", person_q, person_p, "national_id"),
    ]
    assert {e.organisation_id for e in merges} == {"H001", "H002"}
    assert all(e.triggering_event_id == "ev4" for e in merges)
    assert all(e.effective_time_ms == T0 + 10 * MINUTE for e in merges)
    assert "2 record(s) merged" in merges[0].explanation
    assert state.values[f"mpi.person|{person_q}"]["members"] == ["rk3", "rk1", "rk2"]
    assert state.values[f"mpi.person|{person_p}"]["merged_into"] == person_q
    assert person_of(state, "rk1") == person_of(state, "rk2") == person_q


def test_conflicting_id_unmerges_the_record_to_a_new_person(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0, nid=NID_A)
    observe(index, tokeniser, state, "rk2", "ev2", T0 + 1, organisation="H002")
    person = person_of(state, "rk1")
    assert person_of(state, "rk2") == person
    events = observe(
        index, tokeniser, state, "rk2", "ev3", T0 + MINUTE, organisation="H002", nid=NID_C
    )
    assert len(events) == 1
    split = events[0]
    assert (split.action, split.method, split.previous_person_key) == (
        "unmerge", "national_id", person,
    )
    assert split.person_key not in (person, None)
    assert "moved to a new person of its ID" in split.explanation
    assert state.values[f"mpi.person|{person}"]["members"] == ["rk1"]
    # The new person owns NID_C: a later record with it joins that person.
    later = observe(index, tokeniser, state, "rk3", "ev4", T0 + 2 * MINUTE, nid=NID_C, name="A B")
    assert (later[0].method, later[0].person_key) == ("national_id", split.person_key)


def test_conflicting_id_unmerges_the_record_to_the_person_of_its_id(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0, nid=NID_A)
    observe(index, tokeniser, state, "rk2", "ev2", T0 + 1)
    observe(
        index, tokeniser, state, "rk3", "ev3", T0 + 2, nid=NID_C, name="赵六", birth="1975-12-03"
    )
    events = observe(index, tokeniser, state, "rk2", "ev4", T0 + MINUTE, nid=NID_C)
    assert [(e.action, e.person_key) for e in events] == [("unmerge", person_of(state, "rk3"))]
    assert person_of(state, "rk2") == person_of(state, "rk3")
    assert "moved to the person of its ID" in events[0].explanation


def test_manual_unmerge_pins_the_record(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0, nid=NID_A)
    observe(index, tokeniser, state, "rk2", "ev2", T0 + 1)
    person = person_of(state, "rk1")
    events = index.unmerge("rk2", state, T0 + MINUTE, reason="steward ticket 42")
    assert len(events) == 1
    split = events[0]
    assert (split.action, split.method, split.previous_person_key) == (
        "unmerge", "manual", person,
    )
    assert split.person_key != person
    assert split.effective_time_ms == split.decided_time_ms == T0 + MINUTE
    assert split.triggering_event_id.startswith("manual:")
    assert "steward ticket 42" in split.explanation
    assert person_of(state, "rk2") == split.person_key
    # The steward's split holds against later ID evidence: a review, nothing moves.
    later = observe(index, tokeniser, state, "rk2", "ev3", T0 + 2 * MINUTE, nid=NID_A)
    assert [(e.action, e.person_key) for e in later] == [("review", person)]
    assert person_of(state, "rk2") == split.person_key
    # A record alone in its person has nothing to split from.
    assert index.unmerge("rk1", state, T0 + 3 * MINUTE, reason="check") == []
    with pytest.raises(KeyError, match="not in the patient index"):
        index.unmerge("rk-unknown", state, T0, reason="typo")


# --- idempotence, lateness, bounds ------------------------------------------------------


def test_redelivery_and_repeats_are_idempotent(
    rules: MpiRules, tokeniser: IdentityTokeniser
) -> None:
    observation = tokeniser.observation(
        "rk2", "H002", "ev2", T0 + 1, None, "ZHANG^WEI", "1980-01-15", "M", "13800138000"
    )
    first_ids = []
    for _ in range(2):  # two workers (or a replay after a crash) on fresh state
        state, index = DictState(), PatientIndex(rules, INDEX_KEY)
        observe(index, tokeniser, state, "rk1", "ev1", T0)
        events = index.observe(observation, state, now_ms=T0 + 9)
        first_ids.append([e.link_event_id for e in events])
        before = {key: dict(value) if isinstance(value, dict) else value
                  for key, value in state.values.items()}
        assert index.observe(observation, state, now_ms=T0 + 99) == []
        assert state.values == before  # a redelivery does not even touch the state
        repeat = dict(observation, event_id="ev-repeat", event_time_ms=T0 + MINUTE)
        assert index.observe(repeat, state, now_ms=T0 + 99) == []
        assert state.values["mpi.record|rk2"]["person"] == before["mpi.record|rk2"]["person"]
    assert first_ids[0] == first_ids[1] and len(first_ids[0]) == 1


def test_late_observation_only_fills_gaps(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev2", T0 + MINUTE, phone=None)
    assert observe(
        index, tokeniser, state, "rk1", "ev1", T0, birth="1979-01-01", phone="13800138000"
    ) == []
    features = state.values["mpi.record|rk1"]["features"]
    assert features["birth_date"] == "1980-01-15"  # the newer birth date stays
    assert features["phone"] is not None  # the missing phone is filled
    assert state.values["mpi.record|rk1"]["time_ms"] == T0 + MINUTE


def test_late_evidence_takes_effect_after_earlier_decisions(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    observe(index, tokeniser, state, "rk1", "ev1", T0 + 10 * MINUTE)
    observe(
        index, tokeniser, state, "rk2", "ev2", T0 + 11 * MINUTE,
        nid=NID_A, name="赵六", phone=None,
    )
    # An observation of rk1 dated before its first one arrives late with rk2's ID.
    events = observe(index, tokeniser, state, "rk1", "ev0", T0, nid=NID_A)
    assert [(e.action, e.record_key) for e in events] == [("merge", "rk1")]
    assert events[0].effective_time_ms == T0 + 10 * MINUTE + 1  # after its link, not before
    assert membership_at(events, T0 + 10 * MINUTE + 1) == {"rk1": person_of(state, "rk2")}


def test_blocks_keep_the_newest_records(rules: MpiRules, tokeniser: IdentityTokeniser) -> None:
    small = dataclasses.replace(rules, block_cap=2)
    index, state = PatientIndex(small, INDEX_KEY), DictState()
    for number, name in enumerate(["李娜", "王芳", "刘洋"]):
        observe(index, tokeniser, state, f"rk{number}", f"ev{number}", T0 + number,
                name=name, phone=f"1391234567{number}")
    assert state.values["mpi.block|1980-01-15"] == ["rk1", "rk2"]
    # rk0 fell out of its birth-date block; its phone block still finds it.
    events = observe(
        index, tokeniser, state, "rk9", "ev9", T0 + 9, name="李娜", phone="13912345670"
    )
    assert (events[0].method, events[0].person_key) == ("probabilistic", person_of(state, "rk0"))


def test_invalid_observation_is_rejected(index: PatientIndex, state: DictState) -> None:
    with pytest.raises(IdentityObservationError, match="record_key"):
        index.observe({"organisation_id": "H001", "event_id": "e", "event_time_ms": T0}, state, T0)
    with pytest.raises(IdentityObservationError, match="nid_status"):
        index.observe(
            {"record_key": "r", "organisation_id": "H", "event_id": "e", "event_time_ms": T0,
             "nid_status": "maybe"},
            state, T0,
        )


# --- point-in-time membership -----------------------------------------------------------


def test_membership_history_after_link_merge_unmerge(
    index: PatientIndex, tokeniser: IdentityTokeniser, state: DictState
) -> None:
    history, person_p, person_q = build_merge(index, tokeniser, state)
    history += index.unmerge("rk1", state, T0 + 20 * MINUTE, reason="steward review")
    person_r = person_of(state, "rk1")
    assert person_r not in (person_p, person_q)
    assert membership_at(history, T0 - 1) == {}
    assert membership_at(history, T0 + MINUTE) == {"rk1": person_p, "rk2": person_p}
    assert membership_at(history, T0 + 5 * MINUTE) == {
        "rk1": person_p, "rk2": person_p, "rk3": person_q,
    }
    assert membership_at(history, T0 + 10 * MINUTE) == {
        "rk1": person_q, "rk2": person_q, "rk3": person_q,
    }
    assert membership_at(history, T0 + 20 * MINUTE) == {
        "rk1": person_r, "rk2": person_q, "rk3": person_q,
    }


def test_membership_ignores_reviews_and_orders_ties_by_input() -> None:
    def event(action: str, record: str, person: str, time_ms: int) -> LinkEvent:
        return LinkEvent(
            f"id-{action}-{person}", action, record, person, None, "manual", None, None, "",
            time_ms, "ev", "H001", time_ms, "v",
        )

    events = [
        event("link", "r1", "p1", 10),
        event("review", "r1", "p9", 20),
        event("merge", "r1", "p2", 30),
        event("unmerge", "r1", "p3", 30),
    ]
    assert membership_at(events, 25) == {"r1": "p1"}
    assert membership_at(events, 30) == {"r1": "p3"}


# --- rules file -------------------------------------------------------------------------


def test_shipped_rules_load(rules: MpiRules) -> None:
    assert DEFAULT_MPI_RULES_PATH.name == "mpi.yaml"
    assert rules.version == "2026.11-1"
    assert (rules.link_threshold, rules.review_threshold, rules.block_cap) == (14.0, 8.0, 500)
    assert rules.weights["name"]["agree"] == pytest.approx(7.4919, abs=1e-4)  # log2(0.9/0.005)
    assert rules.weights["phone"]["disagree"] < 0


def _document() -> dict[str, Any]:
    levels = {"agree": {"m": 0.9, "u": 0.01}, "disagree": {"m": 0.1, "u": 0.99}}
    return {
        "version": "t1",
        "thresholds": {"link": 10, "review": 5},
        "name_dice": {"agree": 0.85, "partial": 0.65},
        "block_cap": 10,
        "fields": {
            "name": dict(levels, partial={"m": 0.05, "u": 0.05}),
            "birth_date": {"exact": levels["agree"], "partial": {"m": 0.05, "u": 0.05},
                           "disagree": levels["disagree"]},
            "sex": levels,
            "phone": levels,
        },
    }


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("thresholds", "review"), 10, "thresholds: Value error, review must be below link"),
        (("fields", "sex", "agree", "m"), 1.0, "fields.sex.agree.m"),
        (("block_cap",), 0, "block_cap"),
        (("name_dice", "partial"), 0.9, "name_dice"),
    ],
)
def test_rules_errors_name_the_field(path: tuple[str, ...], value: Any, message: str) -> None:
    document = _document()
    target = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(MpiRulesError, match=re.escape(message)):
        mpi_rules_from_dict(document, "test.yaml")


def test_rules_need_every_level(tmp_path: Any) -> None:
    document = _document()
    del document["fields"]["phone"]["disagree"]
    with pytest.raises(MpiRulesError, match="fields.phone.disagree"):
        mpi_rules_from_dict(document)
    broken = tmp_path / "mpi.yaml"
    broken.write_text("version: [", encoding="utf-8")
    with pytest.raises(MpiRulesError, match="not valid YAML"):
        load_mpi_rules(broken)
