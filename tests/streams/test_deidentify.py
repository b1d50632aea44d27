"""De-identification: free-text scrubbing, tag-driven record masking, generalisation helpers.

All identifiers are invented: ID numbers use the fictional area code 990101, names are common
name shapes, phone numbers are the well-known 138 0013 8000 test pattern and its variants.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from streams.deidentify import (
    DEFAULT_FREE_TEXT_FIELDS,
    SENSITIVITY_TAGS,
    DeidentificationError,
    DirectIdentifierInOutput,
    KnownIdentifiers,
    address_district,
    age_band,
    birth_year,
    deidentify_record,
    field_tags,
    scrub_text,
)

AVRO_DIR = Path(__file__).resolve().parents[2] / "schemas" / "avro"
_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def resident_id(first17: str) -> str:
    """A resident ID with a correct GB 11643 / ISO 7064 MOD 11-2 check character."""
    total = sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True))
    return first17 + "10X98765432"[total % 11]


VALID_ID = resident_id("99010119800101123")
VALID_ID_X = next(
    resident_id(f"9901011980010{n:04d}")
    for n in range(10_000)
    if resident_id(f"9901011980010{n:04d}").endswith("X")
)
WRONG_CHECK_ID = VALID_ID[:-1] + ("0" if VALID_ID[-1] != "0" else "1")

PATIENT = KnownIdentifiers.of(
    names=["张伟", "ZHANG^WEI", None, " "],
    id_numbers=[VALID_ID],
    phones=["+86 139 1234 5678", "0755-8765432"],
    local_ids=["MRN0042"],
)


def scrubbed(text: str, known: KnownIdentifiers | None = None) -> str:
    return scrub_text(text, known).text


def test_the_check_digit_helper_matches_a_published_example() -> None:
    # GB 11643-1999 appendix example: 11010519491231002 -> check character X.
    assert resident_id("11010519491231002") == "11010519491231002X"
    assert VALID_ID != WRONG_CHECK_ID and VALID_ID_X.endswith("X")


# --- ID numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"身份证号：{VALID_ID}", "身份证号：[ID]"),
        (f"身份证号{VALID_ID_X}。", "身份证号[ID]。"),
        (f"id {VALID_ID_X.lower()} on file", "id [ID] on file"),
        (f"证件 {VALID_ID[:6]} {VALID_ID[6:14]} {VALID_ID[14:]} 已核对", "证件 [ID] 已核对"),
        (
            f"{VALID_ID[:6]} {VALID_ID[6:10]} {VALID_ID[10:14]} {VALID_ID[14:]}",
            "[ID]",
        ),
        ("旧证 990101800101123 作废", "旧证 [ID] 作废"),
        ("990101 800101 123", "[ID]"),
        # A failing check digit is still ID-shaped: scrubbed, deliberately.
        (f"ID {WRONG_CHECK_ID}", "ID [ID]"),
        # An 18-digit lab accession number is indistinguishable: over-scrubbed on purpose.
        ("标本号 202611240000000017 已签收", "标本号 [ID] 已签收"),
        ("accession S202611240000000017", "accession S[ID]"),
    ],
)
def test_id_numbers_are_scrubbed(text: str, expected: str) -> None:
    result = scrub_text(text)
    assert result.text == expected
    assert result.counts["id"] == 1
    assert result.total == 1


@pytest.mark.parametrize(
    "text",
    [
        "order H001P000000123",
        "LOINC 2823-3",
        "2026-11-24 08:30",
        "value 0.123456789012345678",  # a float's fraction, not an ID
        "ratio 3.14159265358979323846",
        "count 1234567890123456",  # 16 digits: no ID shape
        "seq 12345678901234567890123",  # 23 digits: part of a longer code
        "WBC 12.5 x10^9/L, PLT 350, INR 1.25",
        "ts 1764000000000",  # epoch ms: 13 digits
        "code P123456789012345Q",  # 15 digits glued to letters
    ],
)
def test_number_shapes_that_are_not_ids_stay(text: str) -> None:
    result = scrub_text(text)
    assert result.text == text
    assert result.counts["id"] == 0


def test_known_ids_and_mrns_match_in_any_spacing() -> None:
    result = scrub_text("病案号 MRN0042，复诊 mrn-0042，M R N 0042", PATIENT)
    assert result.text == "病案号 [ID]，复诊 [ID]，[ID]"
    assert result.counts["id"] == 3


def test_short_known_local_ids_are_ignored_to_spare_clinical_text() -> None:
    known = KnownIdentifiers.of(local_ids=["12"])
    assert scrubbed("血钾 12 mmol/L", known) == "血钾 12 mmol/L"


# --- phone numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phone",
    [
        "13800138000",
        "138 0013 8000",
        "138-0013-8000",
        "+8613800138000",
        "+86 138 0013 8000",
        "+86-138-0013-8000",
        "0086 13800138000",
        "(+86)13800138000",
        "19912345678",
        "010-12345678",
        "0755-1234567",
        "0755 12345678",
        "(0755)12345678",
        "（0755）12345678",
        "0755-12345678-8001",
        "0755-12345678转8001",
    ],
)
def test_phone_numbers_are_scrubbed(phone: str) -> None:
    result = scrub_text(f"联系电话：{phone}，请回电")
    assert result.text == "联系电话：[PHONE]，请回电"
    assert result.counts == {"id": 0, "phone": 1, "name": 0, "email": 0}


@pytest.mark.parametrize(
    "text",
    [
        "12800138000",  # 12x is no mobile prefix
        "138001380001",  # 12 digits
        "1380013800",  # 10 digits
        "0.13800138000 g",  # a decimal fraction
        "2026-11-24",
        "LOINC 2823-3",
        "PLT 150-400",
        "ref 3.5-5.5 mmol/L",
    ],
)
def test_number_shapes_that_are_not_phones_stay(text: str) -> None:
    assert scrub_text(text).text == text


def test_known_phone_numbers_match_without_their_country_code() -> None:
    result = scrub_text("家属电话 13912345678 / 139-1234-5678；办公 8765432", PATIENT)
    assert result.text == "家属电话 [PHONE] / [PHONE]；办公 [PHONE]"
    assert result.counts["phone"] == 3


# --- e-mail -----------------------------------------------------------------------------------


def test_email_addresses_are_scrubbed_before_the_names_inside_them() -> None:
    text = "回执发至 zhang.wei+lab@example-hospital.cn；cc wang_fang@example.org"
    result = scrub_text(text, PATIENT)
    assert result.text == "回执发至 [EMAIL]；cc [EMAIL]"
    assert result.counts == {"id": 0, "phone": 0, "name": 0, "email": 2}


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    ["张伟", "张 伟", "ZHANG^WEI", "Zhang Wei", "Wei Zhang", "ZHANG WEI", "zhangwei", "Zhang, Wei"],
)
def test_known_names_in_every_form_are_scrubbed(form: str) -> None:
    result = scrub_text(f"复核：{form} 结果已告知", PATIENT)
    assert result.text == "复核：[NAME] 结果已告知"
    assert result.counts["name"] == 1


def test_known_pinyin_names_need_whole_words() -> None:
    known = KnownIdentifiers.of(names=["LI^NA"])
    assert scrubbed("Li Na called; lina noted", known) == "[NAME] called; [NAME] noted"
    assert scrubbed("Nali, NA LI", known) == "[NAME], [NAME]"  # given-first forms
    assert scrubbed("Carolina, linear, Nalini", known) == "Carolina, linear, Nalini"


def test_known_three_part_names_in_hl7_and_western_order() -> None:
    known = KnownIdentifiers.of(names=["OUYANG^XIAO^MING"])
    text = "OUYANG XIAO MING; Xiao Ming Ouyang; ouyangxiaoming"
    assert scrubbed(text, known) == "[NAME]; [NAME]; [NAME]"


def test_known_han_name_inside_a_longer_name_is_still_removed() -> None:
    # Han text has no word breaks: the known name is cut out wherever it occurs.
    assert scrubbed("张伟明来电", PATIENT) == "[NAME]明来电"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("姓名：李娜", "姓名：[NAME]"),
        ("姓名:李娜，女，45岁", "姓名:[NAME]，女，45岁"),
        ("患者姓名 王建国", "患者姓名 [NAME]"),
        ("患者刘洋因胸痛入院", "患者[NAME]因胸痛入院"),
        ("病人赵敏，男", "病人[NAME]，男"),
        ("家属王芳陪同", "家属[NAME]陪同"),
        ("联系人：李娜 电话已留", "联系人：[NAME] 电话已留"),
        ("紧急联系人陈静电话", "紧急联系人[NAME]电话"),
        ("医生王强已复核", "医生[NAME]已复核"),
        ("主治医师：孙丽", "主治医师：[NAME]"),
        ("护士长刘芳签字", "护士长[NAME]签字"),
        ("护士 周敏 抽血", "护士 [NAME] 抽血"),
        ("医生：欧阳明月", "医生：[NAME]"),
        ("报告人：司马光", "报告人：[NAME]"),
        ("姓名：于洋", "姓名：[NAME]"),  # 于 after an explicit separator is a surname
        ("姓名：张伟明华", "姓名：[NAME]华"),  # no boundary: the longest form is cut
        ("医生：王强、李娜、赵敏已会诊", "医生：[NAME]、[NAME]、[NAME]已会诊"),
    ],
)
def test_labelled_han_names_are_scrubbed(text: str, expected: str) -> None:
    result = scrub_text(text)
    assert result.text == expected
    assert result.counts["name"] == expected.count("[NAME]")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Patient Zhang Wei was admitted", "Patient [NAME] was admitted"),
        ("Dr. Li reviewed the result", "Dr. [NAME] reviewed the result"),
        ("Dr Wang Xiao Ming on call", "Dr [NAME] on call"),
        ("Mrs Chen informed", "Mrs [NAME] informed"),
        ("Contact: WANG FANG, daughter", "Contact: [NAME], daughter"),
        ("Name: Liu Yang", "Name: [NAME]"),
        ("姓名：ZHANG SAN", "姓名：[NAME]"),
        ("Nurse Zhou collected", "Nurse [NAME] collected"),
    ],
)
def test_labelled_latin_names_are_scrubbed(text: str, expected: str) -> None:
    result = scrub_text(text)
    assert result.text == expected
    assert result.counts["name"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "血钾 6.9 mmol/L，标本溶血，请重新采血",
        "Hemolysed specimen, recollect",
        "Potassium 6.9 mmol/L critical",
        "LOINC 2823-3",
        "order H001P000000123",
        "2026-11-24 08:30",
        "王氏综合征",  # an eponym, kept (see the module docstring)
        "患者王氏综合征病史",
        "诊断：王氏综合征",
        "患者于今晨8时入院",
        "患者于昨日行CT检查",
        "患者曾于2020年行阑尾切除术",
        "患者曾行手术",
        "患者高热3天，黄疸，周身乏力",
        "患者戴呼吸机",
        "患者白细胞升高",
        "病人意识清楚，生命体征平稳",
        "患者陈述：胸痛",
        "患者马上转入ICU",
        "医生建议复查血钾",
        "护士站已通知",
        "患者常有头晕",
        "患者史无特殊",
        "患者孙女陪同",
        "病人何时入院不详",
        "患者杜冷丁50mg肌注",
        "患者易怒，夜间烦躁",
        "Patient ID: 123",
        "Patient HIV negative",
        "patient reports chest pain",
        "Outpatient Clinic, Inpatient Ward",
        "Patient Care Unit",
        "Contact Precautions",
        "MS, DR, MR imaging",
        "DR检查未见异常",
        "Name: unknown",
    ],
)
def test_clinical_text_is_left_alone(text: str) -> None:
    result = scrub_text(text)
    assert result.text == text
    assert result.total == 0


def test_a_realistic_comment_loses_every_identifier_and_keeps_the_clinical_facts() -> None:
    text = (
        f"危急值：血钾 6.9 mmol/L（参考 3.5-5.5），已电话通知医生王强 13800138000，"
        f"患者张伟（身份证 {VALID_ID}，病案号 MRN0042）于 2026-11-24 08:30 复查。"
        f"Contact: LI NA, li.na@example.cn"
    )
    result = scrub_text(text, PATIENT)
    assert result.text == (
        "危急值：血钾 6.9 mmol/L（参考 3.5-5.5），已电话通知医生[NAME] [PHONE]，"
        "患者[NAME]（身份证 [ID]，病案号 [ID]）于 2026-11-24 08:30 复查。"
        "Contact: [NAME], [EMAIL]"
    )
    assert result.counts == {"id": 2, "phone": 1, "name": 3, "email": 1}


def test_scrubbing_is_idempotent() -> None:
    text = f"姓名：李娜 {VALID_ID} 13800138000 a@b.cn Dr. Li 张伟"
    once = scrub_text(text, PATIENT)
    twice = scrub_text(once.text, PATIENT)
    assert twice.text == once.text
    assert twice.total == 0
    assert once.total == 6


def test_known_identifiers_never_show_in_their_repr() -> None:
    shown = repr(PATIENT)
    assert shown == "KnownIdentifiers(names=2, id_numbers=1, phones=2, local_ids=1)"
    for secret in ("张伟", "ZHANG", VALID_ID, "1234", "MRN"):
        assert secret not in shown


# --- schemas and tags -------------------------------------------------------------------------


def _schemas() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(AVRO_DIR.glob("*.avsc"))}


def test_no_norm_or_alert_schema_carries_a_direct_identifier() -> None:
    checked = []
    for file_name, schema in _schemas().items():
        if schema["namespace"] not in ("medstream.norm", "medstream.alert"):
            continue
        tags = field_tags(schema)
        direct = [name for name, tag in tags.items() if tag == "direct_identifier"]
        assert direct == [], file_name
        checked.append(schema["name"])
    assert {"Alert", "ClaimLine", "Diagnosis", "Encounter", "LabResult", "Observation"} <= set(
        checked
    )


def test_raw_schemas_carry_direct_identifiers_and_output_masking_refuses_them() -> None:
    schemas = _schemas()
    expected = {
        "emr_row_change.v1.avsc": "after",
        "hl7_message.v1.avsc": "payload",
        "device_packet.v1.avsc": "patient_ref",
        "claim.v1.avsc": "patient_id_number",
    }
    for file_name, field_name in expected.items():
        tags = field_tags(schemas[file_name])
        assert tags[field_name] == "direct_identifier"
        with pytest.raises(DirectIdentifierInOutput, match="direct_identifier") as excinfo:
            deidentify_record({}, tags, None, DEFAULT_FREE_TEXT_FIELDS)
        assert excinfo.value.field_name in tags
        assert tags[excinfo.value.field_name] == "direct_identifier"


def test_field_tags_walks_nested_records_in_arrays_and_unions() -> None:
    claim = field_tags(_schemas()["claim.v1.avsc"])
    assert claim["lines"] == "clinical"
    assert claim["lines.item_display"] == "clinical"
    assert claim["lines.service_date"] == "quasi_identifier"
    schema = {
        "type": "record",
        "name": "T",
        "fields": [
            {
                "name": "contact",
                "sensitivity": "clinical",
                "type": [
                    "null",
                    {
                        "type": "record",
                        "name": "C",
                        "fields": [{"name": "note", "type": "string", "sensitivity": "clinical"}],
                    },
                ],
            }
        ],
    }
    assert field_tags(schema) == {"contact": "clinical", "contact.note": "clinical"}


def test_every_schema_field_has_a_known_tag() -> None:
    for file_name, schema in _schemas().items():
        assert set(field_tags(schema).values()) <= set(SENSITIVITY_TAGS), file_name


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"name": "x", "type": "string"}, "field 'x' has no sensitivity tag"),
        ({"name": "x", "type": "string", "sensitivity": "secret"}, "unknown tag 'secret'"),
    ],
)
def test_field_tags_refuses_untagged_fields(field: dict[str, Any], message: str) -> None:
    with pytest.raises(DeidentificationError, match=message):
        field_tags({"type": "record", "name": "T", "fields": [field]})


def _lab_result(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": "e1",
        "source_kind": "hl7_lab",
        "source_system": "LIS",
        "organisation_id": "H001",
        "event_time": 1_764_000_000_000,
        "ingest_time": 1_764_000_001_000,
        "normalised_time": 1_764_000_002_000,
        "source_topic": "raw.hl7",
        "source_partition": 0,
        "source_offset": 7,
        "record_index": 0,
        "record_count": 1,
        "source_ref": "M1",
        "mapping_version": "test-2026.1",
        "person_key": "a" * 32,
        "order_id": "H001P000000123",
        "loinc_code": "2823-3",
        "local_code": "K",
        "local_display": "血钾(张伟)",
        "value": 6.9,
        "value_text": "复查，联系人：李娜 13800138000",
        "unit": "mmol/L",
        "original_value": "6.9",
        "original_unit": "mmol/L",
        "abnormal_flag": "HH",
        "result_status": "F",
        "specimen_status": None,
        "mapping_status": "mapped",
        "reference_low": 3.5,
        "reference_high": 5.5,
    }
    record.update(overrides)
    return record


def test_a_lab_result_has_its_free_text_scrubbed_and_everything_else_kept() -> None:
    tags = field_tags(_schemas()["lab_result.v2.avsc"])
    record = _lab_result()
    output = deidentify_record(record, tags, PATIENT, DEFAULT_FREE_TEXT_FIELDS)
    assert output["local_display"] == "血钾([NAME])"
    assert output["value_text"] == "复查，联系人：[NAME] [PHONE]"
    changed = {name for name in record if output[name] != record[name]}
    assert changed == {"local_display", "value_text"}
    assert output is not record and record["local_display"] == "血钾(张伟)"
    assert list(output) == list(record)


def test_none_and_numbers_in_free_text_fields_pass() -> None:
    tags = field_tags(_schemas()["lab_result.v2.avsc"])
    output = deidentify_record(
        _lab_result(value_text=None), tags, None, frozenset({"value_text", "value"})
    )
    assert output["value_text"] is None
    assert output["value"] == 6.9


def test_a_record_field_unknown_to_the_tags_is_refused() -> None:
    tags = field_tags(_schemas()["lab_result.v2.avsc"])
    with pytest.raises(DeidentificationError, match="field 'patient_name' is not in the schema"):
        deidentify_record(_lab_result(patient_name="x"), tags, None, DEFAULT_FREE_TEXT_FIELDS)


def test_nested_free_text_is_scrubbed_by_path_or_leaf_name() -> None:
    tags = {
        "claim_id": "operational",
        "lines": "clinical",
        "lines.item_display": "clinical",
        "lines.amount": "operational",
    }
    record: dict[str, Any] = {
        "claim_id": "C1",
        "lines": [{"item_display": "护士王芳代购 13800138000", "amount": 12.5}],
    }
    for free_text in (frozenset({"lines.item_display"}), frozenset({"item_display"})):
        output = deidentify_record(record, tags, None, free_text)
        assert output == {
            "claim_id": "C1",
            "lines": [{"item_display": "护士[NAME]代购 [PHONE]", "amount": 12.5}],
        }
    assert record["lines"][0]["item_display"] == "护士王芳代购 13800138000"


def test_the_direct_identifier_error_names_the_field_not_a_value() -> None:
    tags = {"event_id": "operational", "patient_name": "direct_identifier"}
    with pytest.raises(DirectIdentifierInOutput) as excinfo:
        deidentify_record({"event_id": "e1", "patient_name": "张伟"}, tags, None, frozenset())
    assert excinfo.value.field_name == "patient_name"
    assert "patient_name" in str(excinfo.value)
    assert "张伟" not in str(excinfo.value)


# --- generalisation ---------------------------------------------------------------------------


def test_birth_year_of_dates_datetimes_and_avro_days() -> None:
    assert birth_year(date(1980, 1, 1)) == 1980
    assert birth_year(datetime(1975, 6, 30, 23, 0, tzinfo=UTC)) == 1975
    assert birth_year(3652) == 1980  # 1980-01-01 is day 3652 after 1970-01-01
    assert birth_year(-1) == 1969


@pytest.mark.parametrize(
    ("born", "at", "band"),
    [
        (date(1980, 1, 1), date(2026, 11, 24), "45-49"),
        (date(1982, 11, 24), date(2026, 11, 24), "40-44"),  # 44th birthday today
        (date(1981, 11, 25), date(2026, 11, 24), "40-44"),  # 45 only tomorrow
        (date(1981, 11, 24), date(2026, 11, 24), "45-49"),
        (date(2026, 11, 24), date(2026, 11, 24), "0-4"),
        (date(2021, 11, 25), date(2026, 11, 24), "0-4"),
        (date(2021, 11, 24), date(2026, 11, 24), "5-9"),
        (date(1937, 11, 25), date(2026, 11, 24), "85-89"),  # 88
        (date(1936, 11, 25), date(2026, 11, 24), "85-89"),  # 89
        (date(1936, 11, 24), date(2026, 11, 24), "90+"),  # 90
        (date(1920, 1, 1), date(2026, 11, 24), "90+"),
        (date(1984, 2, 29), date(2029, 2, 28), "40-44"),  # 44: leap-day birthday not yet
        (date(1984, 2, 29), date(2029, 3, 1), "45-49"),
        (3652, date(2025, 1, 1), "45-49"),  # Avro int days
    ],
)
def test_age_band(born: date | int, at: date, band: str) -> None:
    assert age_band(born, at) == band


def test_age_band_counts_event_times_on_the_china_calendar() -> None:
    # 2026-11-23 17:00 UTC is already 2026-11-24 01:00 in China: the 45th birthday.
    at_ms = int(datetime(2026, 11, 23, 17, 0, tzinfo=UTC).timestamp() * 1000)
    assert age_band(date(1981, 11, 24), at_ms) == "45-49"
    assert age_band(date(1981, 11, 24), datetime(2026, 11, 23, 17, 0, tzinfo=UTC)) == "45-49"
    assert age_band(date(1981, 11, 24), at_ms, tz=UTC) == "40-44"


def test_age_band_refuses_impossible_inputs() -> None:
    with pytest.raises(ValueError, match="before the birth date"):
        age_band(date(2026, 11, 25), date(2026, 11, 24))
    with pytest.raises(ValueError, match="naive datetime"):
        age_band(date(1980, 1, 1), datetime(2026, 11, 24))


@pytest.mark.parametrize(
    ("address", "district"),
    [
        ("云溪省云溪市东城区幸福路12号3单元", "云溪省云溪市东城区"),
        ("中国 云溪省 云溪市 东城区 幸福路12号", "云溪省云溪市东城区"),
        ("云溪省清河县清河镇幸福村3组", "云溪省清河县"),
        ("北京市朝阳区建国路88号", "北京市朝阳区"),
        ("北京市市辖区东城区景山街道", "北京市东城区"),  # code-table placeholder dropped
        ("上海市浦东新区张江路1号", "上海市浦东新区"),
        ("重庆市云阳县人民路", "重庆市云阳县"),
        ("山东省济南市市中区经四路", "山东省济南市市中区"),
        ("江苏省苏州市昆山市前进路", "江苏省苏州市昆山市"),  # county-level city
        ("江苏省镇江市京口区", "江苏省镇江市京口区"),
        ("河北省唐山市路北区", "河北省唐山市路北区"),
        ("内蒙古自治区呼和浩特市新城区", "内蒙古自治区呼和浩特市新城区"),
        ("内蒙古自治区锡林郭勒盟锡林浩特市", "内蒙古自治区锡林郭勒盟锡林浩特市"),
        ("内蒙古自治区兴安盟科尔沁右翼前旗", "内蒙古自治区兴安盟科尔沁右翼前旗"),
        ("新疆维吾尔自治区喀什地区喀什市人民路", "新疆维吾尔自治区喀什地区喀什市"),
        ("吉林省延边朝鲜族自治州延吉市", "吉林省延边朝鲜族自治州延吉市"),
        ("云南省双江拉祜族佤族布朗族傣族自治县勐勐镇", "云南省双江拉祜族佤族布朗族傣族自治县"),
        ("香港特别行政区油尖旺区弥敦道", "香港特别行政区油尖旺区"),
        ("东城区幸福路12号", "东城区"),
    ],
)
def test_address_district(address: str, district: str) -> None:
    assert address_district(address) == district


@pytest.mark.parametrize(
    "address",
    [
        None,
        "",
        "幸福路12号",
        "云溪省云溪市",  # no county level given
        "湖北省仙桃市",  # a county-level city directly under a province reads as a city
        "云溪省云溪市幸福小区3栋",  # a housing estate, not a district
        "云溪省云溪市幸福路东区12号",  # a street before any district
        "云溪省云溪市清河镇东区",  # a township before any district
        "云溪市云溪省东城区",  # levels out of order
    ],
)
def test_address_without_a_district_gives_none(address: str | None) -> None:
    assert address_district(address) is None
