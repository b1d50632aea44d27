"""The steward's worklist as a terminal table: what each row asks the steward to do."""

from __future__ import annotations

from datetime import UTC, datetime

from medstream.worklist import WorklistEntry, render_worklist


def entry(local_code: str, status: str, now_mapped: bool = False) -> WorklistEntry:
    seen = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    return WorklistEntry(
        "H001", "lab", local_code, "Kalium", 3, seen, seen, status, "2026.12-1", ["LIS"],
        [("2823-3", "Potassium [Moles/volume] in Serum or Plasma", 0.91)] if status == "unmapped"
        else [], now_mapped,
    )


def test_a_unit_gap_says_to_add_a_unit_alias_and_other_rows_keep_their_notes() -> None:
    table = render_worklist(
        [entry("K [furlong]", "unit_unmapped"), entry("KX", "unmapped"),
         entry("KA", "ambiguous"), entry("KM", "unmapped", now_mapped=True)],
        "2026.12-1",
    ).splitlines()
    assert table[1].startswith("H001   lab           K [furlong]        Kalium")
    assert table[1].endswith("  - [unit not convertible: add it to unit_aliases]")
    assert table[2].endswith("  2823-3 Potassium [Moles/volume] (0.91)")
    assert table[3].endswith(" [ambiguous]")
    assert table[4].endswith(" [mapped in 2026.12-1]")
    assert table[5] == (
        "3 code(s) to map, 1 already mapped in the current dictionary (they leave the list as "
        "new events are mapped)"
    )
