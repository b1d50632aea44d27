"""What a raw record says about its patient, read in the normalise stage and never published.

:func:`patient_identities` reads the demographics of a raw record (HL7 PID segments, an
EMR ``patient_visit`` row, a claim's patient fields): they feed the master patient index
as keyed tokens (:class:`streams.mpi.IdentityTokeniser`) and tell the free-text scrubber
which names and numbers to remove from this record's texts. The clear values live only
in this process, for the duration of one record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from streams.deidentify import KnownIdentifiers
from streams.pseudonym import Pseudonymiser

_PID: Final = "PID"
_DEMOGRAPHICS: Final = ("national_id", "name", "birth_date", "sex", "phone")


@dataclass(frozen=True, slots=True)
class PatientIdentity:
    """Clear demographics of one patient record (organisation + MRN). In-process only."""

    record_key: str
    organisation_id: str
    mrn: str
    national_id: str | None
    name: str | None
    birth_date: str | None
    sex: str | None
    phone: str | None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _hl7_identities(
    raw: Mapping[str, Any], pseudonymiser: Pseudonymiser
) -> list[PatientIdentity]:
    """Every PID of an HL7 v2 message (ORU^R01 repeats it per patient)."""
    payload = raw.get("payload") or ""
    organisation_id = raw["organisation_id"]
    segments = payload.replace("\n", "\r").split("\r")
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        return []
    field_sep, component_sep, repeat_sep = segments[0][3], segments[0][4], segments[0][5]
    found: list[PatientIdentity] = []
    for segment in segments:
        if not segment.startswith(_PID + field_sep):
            continue
        fields = segment.split(field_sep)

        def field(number: int, fields: list[str] = fields) -> str:
            return fields[number] if len(fields) > number else ""

        mrn = national_id = None
        untyped = None
        for identifier in field(3).split(repeat_sep):
            parts = identifier.split(component_sep)
            value = parts[0].strip()
            kind = parts[4].strip().upper() if len(parts) > 4 else ""
            if kind == "MR" and value:
                mrn = mrn or value
            elif kind == "NI" and value:
                national_id = national_id or value
            elif not kind and value and untyped is None:
                untyped = value
        mrn = mrn or untyped
        if not mrn:
            continue
        name_parts = field(5).split(repeat_sep)[0].split(component_sep)
        name = "^".join(p for p in name_parts[:2] if p) or None
        birth = field(7)[:8]
        birth_date = f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}" if len(birth) == 8 else None
        phone = field(13).split(repeat_sep)[0].split(component_sep)[0].strip() or None
        found.append(
            PatientIdentity(
                pseudonymiser.person_key(organisation_id, mrn),
                organisation_id,
                mrn,
                national_id,
                name,
                birth_date,
                _text(field(8)),
                phone,
            )
        )
    return found


def patient_identities(
    source_kind: str, raw: Mapping[str, Any], pseudonymiser: Pseudonymiser
) -> list[PatientIdentity]:
    """The patient records a decoded raw record describes, with their demographics."""
    organisation_id = raw.get("organisation_id") or ""
    if source_kind == "hl7_lab":
        return _hl7_identities(raw, pseudonymiser)
    if source_kind == "emr_cdc":
        row = raw.get("after") or raw.get("before") or {}
        return _record(
            pseudonymiser, organisation_id, row.get("patient_mrn"),
            national_id=row.get("id_number"), name=row.get("patient_name"),
            birth_date=row.get("birth_date"), sex=row.get("sex"), phone=row.get("phone"),
        )
    if source_kind == "claim":
        return _record(
            pseudonymiser, organisation_id, raw.get("patient_local_id"),
            national_id=raw.get("patient_id_number"),
        )
    if source_kind == "device":
        return _record(pseudonymiser, organisation_id, raw.get("patient_ref"))
    return []


def _record(
    pseudonymiser: Pseudonymiser,
    organisation_id: str,
    mrn: Any,
    **demographics: Any,
) -> list[PatientIdentity]:
    """The one patient record a row, claim or packet names, if it names one."""
    local_id = _text(mrn)
    if not local_id:
        return []
    fields = {name: _text(demographics.get(name)) for name in _DEMOGRAPHICS}
    return [
        PatientIdentity(
            pseudonymiser.person_key(organisation_id, local_id), organisation_id, local_id,
            **fields,
        )
    ]


def known_identifiers(identities: list[PatientIdentity]) -> KnownIdentifiers:
    """What the scrubber must remove from this record's free texts."""
    return KnownIdentifiers.of(
        names=[i.name for i in identities if i.name],
        id_numbers=[i.national_id for i in identities if i.national_id],
        phones=[i.phone for i in identities if i.phone],
        local_ids=[i.mrn for i in identities],
    )


def has_demographics(identity: PatientIdentity) -> bool:
    """True when the record says more than its MRN (worth an index observation)."""
    return any((identity.national_id, identity.name, identity.birth_date, identity.phone))
