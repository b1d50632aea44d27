"""De-identification of normalised records, driven by the Avro ``sensitivity`` tags.

Every field of every contract carries one tag: operational, clinical, pseudonym,
quasi_identifier or direct_identifier. A record bound for a norm or alert topic (and so for
ClickHouse) must hold no direct identifier at all; its free-text clinical strings are scrubbed
of ID numbers, phone numbers, e-mail addresses and names (:func:`scrub_text`), and analyst
views coarsen quasi-identifiers (:func:`birth_year`, :func:`age_band`,
:func:`address_district`).

What :func:`scrub_text` replaces, and the decisions behind it:

- ``[ID]``: Chinese resident ID numbers, 18 characters (17 digits and a digit or X, optionally
  grouped 6-8-4 or 6-4-4-4 by single spaces) and old 15-digit numbers. The check digit is NOT
  verified: any ID-shaped token is scrubbed, so an 18-digit lab accession number becomes
  ``[ID]`` too (over-scrubbing an accession is harmless, leaking a mistyped ID is not). Digit
  runs inside a decimal fraction are left alone. Also the record's own known ID numbers and
  local ids (MRNs) in any spacing. Passports, military IDs, Hong Kong/Macau/Taiwan permits and
  bank card numbers are out of scope.
- ``[PHONE]``: mainland mobiles (1[3-9] and 9 digits, optional +86/0086 prefix, spaces or
  dashes between the 3-4-4 groups; any such 11-digit number is scrubbed) and landlines
  (0, a 2-3 digit area code, a dash or space, 7-8 digits, or ``(0755)``-style, with any
  extension), plus the record's known phone numbers, also without their area code.
- ``[EMAIL]``: e-mail addresses.
- ``[NAME]``: (a) the record's own patient's names given in :class:`KnownIdentifiers`: Han
  forms anywhere (Han text has no word breaks), pinyin forms in either order and with any
  separator, or none, case-insensitively; (b) names without prior knowledge after a label
  (姓名, 患者, 病人, 家属, 联系人, 医生/医师, 护士...): 2-4 Han characters starting with a
  common surname, or 1-3 capitalised Latin words after Mr/Mrs/Ms/Dr/Patient/Name:/Contact:.
  Contextual Han names must end at punctuation, a non-Han character or a word that usually
  follows a name (先生, 因, 诉, 男...); phrases that begin with a surname character but are
  clinical (高热, 黄疸, 周身...) and prepositions after 患者 (于, 曾...) are excluded.
  Eponyms of the form 王氏综合征 are clinical, not names, and are kept. Unlabelled names of
  third parties cannot be found without a dictionary and stay (a known limitation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import Any, Final

from streams.model import as_date

#: The sensitivity tags of the Avro contracts, most sensitive first.
SENSITIVITY_TAGS: Final = (
    "direct_identifier",
    "quasi_identifier",
    "pseudonym",
    "clinical",
    "operational",
)

#: Free-text fields of the norm, alert and dead-letter contracts that may carry identifiers
#: typed by people (a local display name, a result comment, a rule explanation, a reason).
DEFAULT_FREE_TEXT_FIELDS: Final[frozenset[str]] = frozenset(
    {"local_display", "value_text", "original_value", "item_display", "explanation", "reason"}
)

ID_TOKEN: Final = "[ID]"
PHONE_TOKEN: Final = "[PHONE]"
NAME_TOKEN: Final = "[NAME]"
EMAIL_TOKEN: Final = "[EMAIL]"
#: The kinds counted in :class:`ScrubResult`, each with its replacement token.
TOKEN_BY_KIND: Final[Mapping[str, str]] = {
    "id": ID_TOKEN,
    "phone": PHONE_TOKEN,
    "name": NAME_TOKEN,
    "email": EMAIL_TOKEN,
}

#: Ages are counted on the calendar of the region the platform serves.
CHINA_STANDARD_TIME: Final[tzinfo] = timezone(timedelta(hours=8), "CST")


class DeidentificationError(ValueError):
    """A schema or record cannot be de-identified safely (a field without a usable tag)."""


class DirectIdentifierInOutput(DeidentificationError):
    """An output record or schema carries a field tagged direct_identifier.

    The message names the field, never its value.
    """

    def __init__(self, field_name: str) -> None:
        super().__init__(
            f"field {field_name!r} is tagged direct_identifier: a de-identified output "
            "(norm or alert) record must never carry one"
        )
        self.field_name = field_name


# --- known identifiers ----------------------------------------------------------------------


def _clean(values: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in values if v is not None and v.strip()))


@dataclass(frozen=True, slots=True, repr=False)
class KnownIdentifiers:
    """The identifiers of the record's own patient, which the normalise stage already holds.

    Names in any form the sources use: Han (张伟), HL7 XPN (ZHANG^WEI), "Zhang Wei",
    "Wei Zhang", "zhangwei". The repr shows counts only, so a log line can never leak them.
    """

    names: tuple[str, ...] = ()
    id_numbers: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    local_ids: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        names: Iterable[str | None] = (),
        id_numbers: Iterable[str | None] = (),
        phones: Iterable[str | None] = (),
        local_ids: Iterable[str | None] = (),
    ) -> KnownIdentifiers:
        """Build from possibly missing source fields: None and blank values are dropped."""
        return cls(_clean(names), _clean(id_numbers), _clean(phones), _clean(local_ids))

    def __repr__(self) -> str:
        return (
            f"KnownIdentifiers(names={len(self.names)}, id_numbers={len(self.id_numbers)}, "
            f"phones={len(self.phones)}, local_ids={len(self.local_ids)})"
        )


@dataclass(frozen=True, slots=True)
class ScrubResult:
    """Scrubbed text and how many identifiers of each kind (id, phone, name, email) it lost."""

    text: str
    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All replacements made."""
        return sum(self.counts.values())


# --- patterns -------------------------------------------------------------------------------

_HAN: Final = "\u4e00-\u9fff"

_EMAIL: Final = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w])"
)

# Not glued to other digits nor part of a decimal fraction; letters around an 18-character
# ID do not protect it (an accession such as S + 18 digits is scrubbed: over-scrub wins).
_ID_18: Final = re.compile(
    r"(?<!\d)(?<!\d\.)\d{6} ?\d{4} ?\d{4} ?\d{3}[\dXx](?![\dA-Za-z])(?!\.\d)"
)
# 15-digit runs appear in codes more often than 18-digit ones: letters around them protect.
_ID_15: Final = re.compile(r"(?<![\dA-Za-z.])\d{6} ?\d{6} ?\d{3}(?![\dA-Za-z])(?!\.\d)")

_MOBILE: Final = re.compile(
    r"(?<![\d+])(?<!\d\.)(?:\(?(?:\+|00)86\)?[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)"
)
# An extension (-8001, 转8001) goes with the number it extends.
_LANDLINE: Final = re.compile(
    r"(?<![\d-])(?:0\d{2,3}[-－ ]|\(0\d{2,3}\) ?|（0\d{2,3}） ?)\d{7,8}(?:[-转]\d{1,5})?(?![\d-])"
)

# The commonest Chinese surnames: the top hundred by population and some forty more, leaving
# out characters that mostly open clinical words (左侧, 包块, 尚可, 凌晨, 焦虑, 梅毒, 涂片...).
_SINGLE_SURNAMES: Final = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林高罗郑梁谢宋唐许韩邓冯曹彭曾肖田董潘袁蔡蒋余于杜叶"
    "程魏苏吕丁任卢姚沈钟姜崔谭陆范汪廖石金韦贾夏付傅方邹熊白孟秦邱侯江尹薛闫阎段雷龙黎史陶"
    "贺毛郝顾龚邵万覃武钱戴严莫孔向常汤康易乔赖文施樊葛邢伍庞颜倪庄聂章鲁岳翟殷詹欧耿兰俞柳"
    "祝阮柯纪童毕季裴翁冉骆蓝辛靳鲍喻祁饶穆卓"
)
_COMPOUND_SURNAMES: Final = tuple(
    (
        "欧阳 司马 诸葛 上官 东方 皇甫 尉迟 公孙 慕容 令狐 长孙 宇文 司徒 夏侯 "
        "轩辕 端木 独孤 南宫 西门 呼延 钟离 淳于 单于 申屠 澹台 赫连 闻人"
    ).split()
)
# After 患者/病人 these surname characters are far more often a preposition or adverb
# (患者于今晨..., 患者曾行..., 患者时有..., 既往史...): a name starting with one needs an
# explicit separator after the label (姓名：于洋).
_SEPARATOR_ONLY_SURNAMES: Final = frozenset("于曾余时向史常")
# Clinical and everyday words that begin with a surname character (kinship: 孙女).
_CLINICAL_PREFIXES: Final = tuple(
    (
        "高热 高烧 高血 高钾 高钠 高钙 高糖 高危 高龄 高度 高压 黄疸 黄染 黄色 白细 白蛋 "
        "白色 白天 周身 周围 周期 周后 周前 周内 周末 周一 周二 周三 周四 周五 周六 周日 "
        "方案 方可 康复 安静 安全 毛发 金黄 文化 戴氧 戴呼 孔径 陈述 严重 易感 石膏 任何 "
        "程度 夏季 付费 庞大 雷诺 万一 叶酸 苏醒 马上 许多 陆续 莫名 江湖 孙女 孙子 "
        "何时 何处 杜冷 潘生 戴眼 汤药 葛根 颜色 殷红 蓝色 易怒 杨梅 徐缓 夏天 方面 范围 "
        "任性 顾虑 文书 许可 钟点 毕业 童年 纪录 章节 施治 丁香 朱砂 姜汤 刘海 熊猫"
    ).split()
)
# Words that typically follow a name, ending it (张伟因胸痛入院, 联系人李娜电话...).
_AFTER_NAME: Final = (
    "先生|女士|小姐|同志|老师|大夫|主任|医生|医师|护士|电话|手机|联系|签字|签名|表示|告知|"
    "同意|拒绝|陪同|要求|之|的|因|于|在|诉|说|男|女|今|昨|自|已|等|和|及|与|将|现|为|是|系|"
    "入|来|称|年|岁|代"
)
_HAN_LABELS: Final = (
    "(?:患者|病人|家属|联系人)?姓名|紧急联系人|联系人|患者|病人|家属|监护人|陪护|"
    "主治医师|主治医生|主任医师|医生|医师|大夫|护士长|护士|报告人|审核人|检验者|采样人|签名"
)
_SEPARATOR: Final = r"[：:\s]"
_SURNAME: Final = "(?:" + "|".join(_COMPOUND_SURNAMES) + f"|[{_SINGLE_SURNAMES}])"
_HAN_NAME: Final = re.compile(
    rf"(?P<label>{_HAN_LABELS})(?P<sep>{_SEPARATOR}*)"
    rf"(?P<name>{_SURNAME}[{_HAN}]{{1,2}}?)"
    rf"(?=$|[^{_HAN}]|{_AFTER_NAME})"
)
# After an explicit separator a label is a form field (姓名：张伟明华): when no boundary ends
# the name, its longest form is taken instead of leaving it.
_HAN_FIELD_NAME: Final = re.compile(
    rf"(?P<label>{_HAN_LABELS}){_SEPARATOR}+(?P<name>{_SURNAME}[{_HAN}]{{1,2}})"
)
# The next name of a list after a name already replaced (王强、李娜).
_HAN_LISTED_NAME: Final = re.compile(
    rf"(?P<label>{re.escape(NAME_TOKEN)}[、/])(?P<name>{_SURNAME}[{_HAN}]{{1,2}}?)"
    rf"(?=$|[^{_HAN}]|{_AFTER_NAME})"
)

_LATIN_WORD: Final = r"[A-Z][a-z]+(?:[-'][A-Za-z][a-z]+)?|[A-Z]{2,}"
_LATIN_NAME: Final = re.compile(
    r"(?:(?<![A-Za-z])(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?[ \t]+"
    r"|(?<![A-Za-z])(?i:patient|name|contact|nurse|doctor|physician)(?:[ \t]*[:：][ \t]*|[ \t]+)"
    rf"|(?:{_HAN_LABELS})[：:][ \t]*)"
    rf"(?P<name>(?:{_LATIN_WORD})(?:[ \t]+(?:{_LATIN_WORD})){{0,2}})"
)
# Capitalised words that follow the labels in clinical text and are not names.
_NOT_LATIN_NAMES: Final = frozenset(
    {
        "id", "mrn", "no", "number", "name", "names", "age", "sex", "dob", "is", "was", "has",
        "had", "the", "a", "an", "in", "on", "of", "with", "without", "denies", "reports",
        "presents", "admitted", "discharged", "status", "record", "records", "care", "notes",
        "information", "info", "identifier", "and", "or", "to", "for", "at", "by", "from",
        "refused", "declined", "consent", "safety", "history", "precautions", "isolation",
        "tracing", "details", "list", "hiv", "hbv", "hcv", "icu", "er", "ed", "bp", "hr", "rr",
        "ct", "mri", "ecg", "ekg", "covid", "transfer", "education", "portal", "unknown",
        "none", "not", "reported", "office", "station", "call",
    }
)  # fmt: skip


def _han_name_allowed(name: str, has_separator: bool) -> bool:
    if len(name) >= 2 and name[1] == "氏":
        return False  # 王氏综合征: an eponym, not a person of this record
    if name.startswith(_CLINICAL_PREFIXES):
        return False
    return has_separator or name[0] not in _SEPARATOR_ONLY_SURNAMES


# --- known identifier patterns --------------------------------------------------------------

_LATIN_NAME_SEPARATORS: Final = r"[\s^,._\-·]"
_MIN_LATIN_NAME_LETTERS: Final = 4
_MIN_LOCAL_ID_CHARS: Final = 4
_KNOWN_LANDLINE: Final = re.compile(r"[(（]?0\d{2,3}[)）]?[-－ ]?(?P<local>\d{7,8})$")


@dataclass(frozen=True, slots=True)
class _KnownPatterns:
    ids: re.Pattern[str] | None
    phones: re.Pattern[str] | None
    names: re.Pattern[str] | None


def _spaced(value: str) -> str:
    # An identifier typed with spaces or dashes anywhere still matches.
    return "[ -]?".join(re.escape(ch) for ch in value)


def _name_alternatives(name: str) -> list[str]:
    alternatives: list[str] = []
    han = re.sub(rf"[^{_HAN}]", "", name)
    if len(han) >= 2:
        alternatives.append(r"\s*".join(re.escape(ch) for ch in han))
    parts = re.split(rf"{_LATIN_NAME_SEPARATORS}+", re.sub(rf"[{_HAN}]", " ", name))
    tokens = [part for part in parts if part.isascii() and part.isalpha()]
    if sum(len(t) for t in tokens) >= _MIN_LATIN_NAME_LETTERS:
        # Family-first (HL7, Chinese order) and given-first (Western order) alike.
        orders = {tuple(tokens), tuple(tokens[1:] + tokens[:1]), tuple(reversed(tokens))}
        for order in sorted(orders):
            joined = f"{_LATIN_NAME_SEPARATORS}*".join(re.escape(t) for t in order)
            alternatives.append(rf"(?<![A-Za-z]){joined}(?![A-Za-z])")
    return alternatives


def _alternation(parts: list[str]) -> re.Pattern[str] | None:
    if not parts:
        return None
    # Longest first, so "Zhang Wei Ming" wins over "Zhang Wei".
    return re.compile("|".join(sorted(set(parts), key=len, reverse=True)), re.IGNORECASE)


@lru_cache(maxsize=256)
def _known_patterns(known: KnownIdentifiers) -> _KnownPatterns:
    # One patient's identifiers are scrubbed from several fields of several events in a row:
    # the bounded cache keeps compiling once per patient.
    compact_ids = (re.sub(r"[\s-]", "", v) for v in (*known.id_numbers, *known.local_ids))
    ids = [
        rf"(?<![0-9A-Za-z]){_spaced(v)}(?![0-9A-Za-z])"
        for v in compact_ids
        if len(v) >= _MIN_LOCAL_ID_CHARS
    ]
    phones: list[str] = []
    for phone in known.phones:
        digits = re.sub(r"\D", "", phone)
        if digits.startswith(("0086", "86")) and len(digits) > 11:
            digits = digits[4:] if digits.startswith("0086") else digits[2:]
        variants = [digits]
        landline = _KNOWN_LANDLINE.match(phone.strip())
        if landline:
            variants.append(landline.group("local"))  # written without its area code too
        phones.extend(rf"(?<!\d){_spaced(v)}(?!\d)" for v in variants if len(v) >= 7)
    names = [alt for name in known.names for alt in _name_alternatives(name)]
    return _KnownPatterns(_alternation(ids), _alternation(phones), _alternation(names))


_NO_KNOWN_PATTERNS: Final = _KnownPatterns(None, None, None)
_FRAGMENT_SPLIT: Final = re.compile(r"[\s^,;，、·.\-_]+")
_NON_ALNUM: Final = re.compile(r"[^0-9a-z]")


def may_hold_known(text: str, known: KnownIdentifiers) -> bool:
    """A cheap test before compiling a patient's patterns: can any of them match at all?

    Every known identifier needs its characters in the text: the compact form of an ID or
    MRN, the last 7 digits of a phone, a Han name, or every part (2+ letters) of a Latin
    name. Most texts (a test name, a unit, a number) hold none, and skip the compile.
    """
    lowered = text.lower()
    compact = _NON_ALNUM.sub("", lowered)
    for value in (*known.id_numbers, *known.local_ids):
        fragment = _NON_ALNUM.sub("", value.lower())
        if fragment and fragment in compact:
            return True
    digits = re.sub(r"\D", "", text)
    for phone in known.phones:
        tail = re.sub(r"\D", "", phone)[-7:]
        if len(tail) == 7 and tail in digits:
            return True
    for name in known.names:
        parts = [p for p in _FRAGMENT_SPLIT.split(name.lower()) if p]
        if any(_is_han(p) for p in parts):
            # Every character present (the name may be written with spaces between them).
            if all(ch in lowered for p in parts if _is_han(p) for ch in p):
                return True
            continue
        latin = [p for p in parts if len(p) >= 2]
        if latin and all(p in lowered or p in compact for p in latin):
            return True
        if latin and "".join(latin) in compact:
            return True
    return False


def _is_han(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


# --- scrubbing ------------------------------------------------------------------------------


def scrub_text(text: str, known: KnownIdentifiers | None = None) -> ScrubResult:
    """Replace ID numbers, phone numbers, e-mail addresses and names with [ID], [PHONE],
    [EMAIL] and [NAME], counting each kind; clinical content is left as it was.

    Idempotent: scrubbing scrubbed text changes nothing. See the module docstring for what
    is and is not recognised.
    """
    counts = dict.fromkeys(TOKEN_BY_KIND, 0)

    def sub(pattern: re.Pattern[str] | None, kind: str, value: str) -> str:
        if pattern is None:
            return value
        value, replaced = pattern.subn(TOKEN_BY_KIND[kind], value)
        counts[kind] += replaced
        return value

    patterns = (
        _known_patterns(known)
        if known is not None and may_hold_known(text, known)
        else _NO_KNOWN_PATTERNS
    )
    # E-mails first: their local parts often hold a name or a phone number.
    text = sub(_EMAIL, "email", text)
    text = sub(patterns.ids, "id", text)
    text = sub(_ID_18, "id", text)
    text = sub(_ID_15, "id", text)
    text = sub(patterns.phones, "phone", text)
    text = sub(_MOBILE, "phone", text)
    text = sub(_LANDLINE, "phone", text)
    text = sub(patterns.names, "name", text)
    text = _scrub_han_names(text, counts)
    text = _scrub_latin_names(text, counts)
    return ScrubResult(text, counts)


def _scrub_han_names(text: str, counts: dict[str, int]) -> str:
    def replace(match: re.Match[str], has_separator: bool) -> str:
        name = match.group("name")
        if not _han_name_allowed(name, has_separator):
            return match.group(0)
        counts["name"] += 1
        whole, offset = match.group(0), match.start()
        start, end = match.start("name") - offset, match.end("name") - offset
        return whole[:start] + NAME_TOKEN + whole[end:]

    text = _HAN_NAME.sub(lambda m: replace(m, bool(m.group("sep"))), text)
    text = _HAN_FIELD_NAME.sub(lambda m: replace(m, True), text)
    # 医生：王强、李娜、张敏: each pass takes one more name of the list; bounded by its length.
    before = None
    while before != text:
        before = text
        text = _HAN_LISTED_NAME.sub(lambda m: replace(m, False), text)
    return text


def _scrub_latin_names(text: str, counts: dict[str, int]) -> str:
    def replace(match: re.Match[str]) -> str:
        name_end = match.start("name")
        for word in re.finditer(r"\S+", match.group("name")):
            if word.group(0).lower() in _NOT_LATIN_NAMES:
                break  # "Patient Zhang Has..." keeps "Has" and what follows
            name_end = match.start("name") + word.end()
        if name_end == match.start("name"):
            return match.group(0)
        counts["name"] += 1
        whole = match.group(0)
        offset = match.start()
        return whole[: match.start("name") - offset] + NAME_TOKEN + whole[name_end - offset :]

    return _LATIN_NAME.sub(replace, text)


# --- tag-driven record masking --------------------------------------------------------------


def field_tags(schema: Mapping[str, Any]) -> dict[str, str]:
    """Field path -> sensitivity tag of a parsed .avsc record (nested record fields dotted).

    Records inside arrays, maps and unions are walked too. A field without a tag, or with a
    tag outside :data:`SENSITIVITY_TAGS`, raises DeidentificationError: an untagged field could
    not be judged, so it must not pass silently.
    """
    tags: dict[str, str] = {}
    schema_name = str(schema.get("name", "<unnamed>"))

    def records_in(avro_type: Any) -> list[Mapping[str, Any]]:
        if isinstance(avro_type, list):
            return [record for branch in avro_type for record in records_in(branch)]
        if not isinstance(avro_type, Mapping):
            return []  # a primitive or a reference to a named type walked where defined
        if avro_type.get("type") == "record":
            return [avro_type]
        if avro_type.get("type") == "array":
            return records_in(avro_type.get("items"))
        if avro_type.get("type") == "map":
            return records_in(avro_type.get("values"))
        return []

    def walk(record: Mapping[str, Any], prefix: str) -> None:
        for avro_field in record.get("fields", []):
            path = prefix + avro_field["name"]
            tag = avro_field.get("sensitivity")
            if tag not in SENSITIVITY_TAGS:
                problem = "has no sensitivity tag" if tag is None else f"has unknown tag {tag!r}"
                raise DeidentificationError(f"{schema_name}: field {path!r} {problem}")
            tags[path] = tag
            for nested in records_in(avro_field["type"]):
                walk(nested, path + ".")

    walk(schema, "")
    return tags


def deidentify_record(
    record: Mapping[str, Any],
    tags: Mapping[str, str],
    known: KnownIdentifiers | None,
    free_text_fields: frozenset[str],
) -> dict[str, Any]:
    """A copy of an output record with its free-text fields scrubbed; every other field as is.

    Raises DirectIdentifierInOutput when the schema's tags hold a direct_identifier field (a
    norm or alert contract must never have one, whether or not the value is set), and
    DeidentificationError for a record field the tags do not know. A free-text field is
    named by its dotted path or its leaf name; lists of strings in it are scrubbed item by item.
    """
    direct = sorted(path for path, tag in tags.items() if tag == "direct_identifier")
    if direct:
        raise DirectIdentifierInOutput(direct[0])
    return _deidentify_fields(record, tags, known, free_text_fields, "")


def _deidentify_fields(
    record: Mapping[str, Any],
    tags: Mapping[str, str],
    known: KnownIdentifiers | None,
    free_text_fields: frozenset[str],
    prefix: str,
) -> dict[str, Any]:
    output: dict[str, Any] = {}
    for name, value in record.items():
        path = prefix + name
        tag = tags.get(path)
        if tag not in SENSITIVITY_TAGS:
            problem = "is not in the schema's tags" if tag is None else f"has unknown tag {tag!r}"
            raise DeidentificationError(f"field {path!r} {problem}: refusing to pass it through")
        if path in free_text_fields or name in free_text_fields:
            output[name] = _scrub_value(value, known)
        elif isinstance(value, Mapping) and any(t.startswith(path + ".") for t in tags):
            output[name] = _deidentify_fields(value, tags, known, free_text_fields, path + ".")
        elif isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
            output[name] = [
                _deidentify_fields(item, tags, known, free_text_fields, path + ".")
                if isinstance(item, Mapping)
                else item
                for item in value
            ]
        else:
            output[name] = value
    return output


def _scrub_value(value: Any, known: KnownIdentifiers | None) -> Any:
    if isinstance(value, str):
        return scrub_text(value, known).text
    if isinstance(value, list):
        return [_scrub_value(item, known) for item in value]
    return value  # None, numbers: nothing typed by a person


# --- generalisation for analyst views -------------------------------------------------------

#: Ages from this one up share a single band (HIPAA Safe Harbor, 45 CFR 164.514(b)(2)(i)(C),
#: aggregates ages over 89 because so few people reach them).
TOP_AGE: Final = 90
AGE_BAND_YEARS: Final = 5


def birth_year(value: date | datetime | int) -> int:
    """The year of a birth date (a date, a datetime, or Avro int days since 1970-01-01)."""
    return as_date(value).year


def _calendar_date(value: date | datetime | int, tz: tzinfo) -> date:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: a point in time must be timezone-aware")
        return value.astimezone(tz).date()
    if isinstance(value, date):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a date, an aware datetime or int epoch ms, got {value!r}")
    return datetime.fromtimestamp(value / 1000, tz).date()


def age_band(
    birth_date: date | int,
    at: date | datetime | int,
    tz: tzinfo = CHINA_STANDARD_TIME,
) -> str:
    """The five-year age band ("40-44") of a person born on ``birth_date`` at ``at``; "90+" above.

    ``birth_date`` is a date or Avro int days; ``at`` a date, an aware datetime or int epoch
    ms (an event time), taken as a calendar date in ``tz`` (China Standard Time by default).
    A birthday counts from its day on (29 February from 1 March in common years).
    """
    born = as_date(birth_date)
    on = _calendar_date(at, tz)
    if on < born:
        raise ValueError("the date of the age lies before the birth date")
    age = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    if age >= TOP_AGE:
        return f"{TOP_AGE}+"
    low = age // AGE_BAND_YEARS * AGE_BAND_YEARS
    return f"{low}-{low + AGE_BAND_YEARS - 1}"


_PROVINCE_LEVEL: Final = 1
_CITY_LEVEL: Final = 2
_COUNTY_LEVEL: Final = 3
# Suffixes of administrative divisions (GB/T 2260), longest first so 自治区 wins over 区.
_DIVISION: Final = re.compile(
    r"(?P<placeholder>市辖区)"
    # The first character may be one that marks a street or township elsewhere (镇江市, 路北区,
    # 道县); later ones may not, so 幸福路东区 or 清河镇北区 are never read as a district.
    r"|(?P<name>[^\W\d][^\W\d路街巷号弄栋楼室组镇乡村道]{0,14}?)"
    r"(?P<suffix>特别行政区|自治区|自治州|自治县|自治旗|地区|省|市|盟|区|县|旗)"
)
# 区 names that are places inside a district, not districts (幸福小区, 东院区...).
_NOT_DISTRICT_ENDINGS: Final = ("小", "社", "校", "景", "厂", "病", "院", "片", "街", "商", "营")
_LEVEL_BY_SUFFIX: Final[Mapping[str, int]] = {
    "特别行政区": _PROVINCE_LEVEL,
    "自治区": _PROVINCE_LEVEL,
    "省": _PROVINCE_LEVEL,
    "自治州": _CITY_LEVEL,
    "地区": _CITY_LEVEL,
    "盟": _CITY_LEVEL,
    "自治县": _COUNTY_LEVEL,
    "自治旗": _COUNTY_LEVEL,
    "区": _COUNTY_LEVEL,
    "县": _COUNTY_LEVEL,
    "旗": _COUNTY_LEVEL,
}
_COUNTRY_PREFIXES: Final = ("中华人民共和国", "中国")


def address_district(text: str | None) -> str | None:
    """A Chinese address cut to the county level: province, city, district or county.

    "云溪省云溪市东城区幸福路12号3单元" -> "云溪省云溪市东城区". Handles 自治区, 自治州, 地区, 盟,
    county-level cities (苏州市昆山市), 县, 旗 and the 市辖区 placeholder of code tables (dropped);
    blanks and a leading 中国 are dropped. None when no county-level division is found
    (a street, a 小区 or a township before any district, or no division at all).
    """
    if text is None:
        return None
    rest = re.sub(r"\s+", "", text)
    for country in _COUNTRY_PREFIXES:
        if rest.startswith(country):
            rest = rest[len(country) :]
            break
    kept: list[str] = []
    level = 0
    while rest:
        match = _DIVISION.match(rest)
        if match is None:
            return None
        rest = rest[match.end() :]
        if match.group("placeholder"):
            if level != _CITY_LEVEL:
                return None
            continue  # 北京市市辖区东城区: the placeholder names no place
        name, suffix = match.group("name"), match.group("suffix")
        if not name:
            return None
        if suffix == "市":
            # A city under a province (or a municipality first), else a county-level city.
            division_level = _CITY_LEVEL if level < _CITY_LEVEL else _COUNTY_LEVEL
        else:
            division_level = _LEVEL_BY_SUFFIX[suffix]
        if suffix == "区" and name.endswith(_NOT_DISTRICT_ENDINGS):
            return None
        if division_level <= level:
            return None
        kept.append(name + suffix)
        level = division_level
        if level == _COUNTY_LEVEL:
            return "".join(kept)
    return None
