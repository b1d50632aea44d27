"""Shared loading of versioned YAML rules files: read, parse, validate, explain what is wrong.

Every rule family (critical values, NEWS2, devices, feeds, claims, ...) loads its rules the
same way, so a bad file fails with the same kind of message everywhere: the path, what was
being loaded and one ``field.path: message`` line per problem, raised as the family's own
error class. The strict base model and the small field types keep the rule models short.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from streams.findings import SEVERITIES

_Model = TypeVar("_Model", bound=BaseModel)


class StrictModel(BaseModel):
    """A rules-file section: unknown keys are errors (typos must not pass silently), frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_severity(value: str) -> str:
    if value not in SEVERITIES:
        raise ValueError(f"must be one of {', '.join(SEVERITIES)}")
    return value


def _finite_or_null(value: float | None) -> float | None:
    # YAML reads .nan and .inf as floats; a limit or weight of either would never compare.
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number or null")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


#: An alert severity of :data:`streams.findings.SEVERITIES` (critical, high, medium, low).
Severity = Annotated[str, AfterValidator(_known_severity)]
#: A number that may be null but never NaN or infinite.
FiniteOrNull = Annotated[float | None, AfterValidator(_finite_or_null)]
#: A number that is never NaN or infinite.
Finite = Annotated[float, AfterValidator(_finite)]


def check_limits(low: float | None, high: float | None) -> None:
    """Refuse a pair of limits that checks nothing (both null) or an empty range (low >= high)."""
    if low is None and high is None:
        raise ValueError("at least one of low and high must be set")
    if low is not None and high is not None and low >= high:
        raise ValueError("low must be below high")


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def validation_message(exc: ValidationError, limit: int = 10) -> str:
    """The problems of a failed validation, one indented ``field.path: message`` line each.

    Only the first ``limit`` are listed (a wholly wrong file would bury the first cause),
    followed by ``... and N more`` when some were left out.
    """
    errors = exc.errors()
    lines = [f"  {_location(item['loc'])}: {item['msg']}" for item in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


def validate_rules(
    model: type[_Model], document: Any, error: type[ValueError], what: str, source: str
) -> _Model:
    """Validate a parsed rules document; raises ``error`` naming the source and each bad field."""
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise error(f"{source}: invalid {what}:\n{validation_message(exc)}") from None


def read_rules_document(path: Path, error: type[ValueError], what: str) -> Any:
    """The parsed YAML of a rules file; raises ``error`` when it cannot be read or parsed."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


#: The rule files shipped with medstream (streams/rules/*.yaml).
SHIPPED_RULES_DIR: Path = Path(__file__).resolve().parent / "rules"


def rule_file(name: str, rules_dir: Path | str | None = None) -> Path:
    """The rules file ``name`` (e.g. ``feeds.yaml``) a site runs with.

    A site keeps the files it changed in its own directory (``MEDSTREAM_STREAMS_RULES_DIR``);
    every file it does not hold comes from the shipped set, so an upgrade still brings new
    rule families. A directory that does not exist is an error, not a silent fallback.
    """
    if rules_dir is None:
        return SHIPPED_RULES_DIR / name
    directory = Path(rules_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"rules directory {directory} does not exist")
    override = directory / name
    return override if override.is_file() else SHIPPED_RULES_DIR / name
