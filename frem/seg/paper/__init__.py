"""The paper's own reported IoU (Ando & Hotta, VISAPP 2021, Tables 1-3), as printed.

``tables.csv`` and ``README.md`` beside this file are shipped unchanged from
the project's record of the paper: they are the paper's facts, shown beside
our numbers with its citation, never our measurements.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent


def _citation() -> str:
    """The first paragraph of README.md: the citation, written there once."""
    paragraphs = (HERE / "README.md").read_text().split("\n\n")
    return " ".join(paragraphs[1].split())


CITATION = _citation()
# Column headers exactly as printed (README.md beside this file).
HEADERS = {
    1: ("menbrane", "nuclear", "background"),
    2: ("menbrane", "nuclear", "background", "Synapus"),
    3: ("menbrane", "nuclear", "background"),
}
TITLES = {
    1: "Table 1 (mouse liver)",
    2: "Table 2 (Drosophila)",
    3: "Table 3 (mouse liver, fixed channels)",
}
HEADER_NOTE = {
    2: ("Table 2's header is printed as for Table 1; the Drosophila classes have no nucleus, "
        "so its second column must be mitochondria (whether the first, 91.80-92.93, is really "
        "membrane cannot be settled from the paper)."),
}
# The paper's model names -> our variants.
VARIANT_OF = {
    "U-Net + SEblock": "baseline",
    "U-Net + SEblock without deep layers": "shallow",
    "U-Net + SEblock + Supervision": "supervision",
    "Dropout (same percentage as FREM)": "dropout",
    "Proposed method (FREM)": "frem",
    "FREM on 10 fixed channels x 10000 (additional experiment)": "frem-fixed",
}
# Which tables a reproduction shows beside its own, by data set.
TABLES_FOR = {"drosophila": (2,), "mouse-liver": (1, 3), "none": ()}


@dataclass(frozen=True)
class PaperRow:
    table: int
    model: str          # as printed
    variant: str        # ours
    iou: tuple          # per class, percent, in the printed column order
    miou: float         # percent


def load_table(number: int) -> list[PaperRow]:
    if number not in HEADERS:
        raise ValueError(f"the paper has Tables 1-3, not {number}")
    rows = []
    with open(HERE / "tables.csv", newline="") as f:
        for row in csv.DictReader(f):
            if int(row["table"]) != number:
                continue
            iou = tuple(float(row[f"class_{i}"]) for i in range(1, len(HEADERS[number]) + 1))
            rows.append(PaperRow(number, row["model"], VARIANT_OF[row["model"]], iou, float(row["miou"])))
    return rows


def tables_for(dataset: str, classes) -> tuple[int, ...]:
    """``auto``: Table 2 for the Drosophila data, Tables 1 and 3 for a mouse-liver copy."""
    if dataset == "drosophila":
        return TABLES_FOR["drosophila"]
    if {c.lower() for c in classes} in ({"membrane", "nucleus", "background"},
                                        {"membrane", "nuclear", "background"}):
        return TABLES_FOR["mouse-liver"]
    return ()
