"""How the CLI prints: one JSON object with --json, a sentence or a table without."""

import sys
from datetime import datetime
from typing import IO, Any

from driftlock_kernel.jsonfmt import iso, to_json


def text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return iso(value) or "-"
    if isinstance(value, (list, tuple)):
        return ",".join(text_value(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[text_value(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(widths[i]) for i, column in enumerate(columns)).rstrip()]
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in cells]
    return "\n".join(lines)


def fields(obj: dict, names: list[str] | None = None) -> str:
    names = names or list(obj)
    width = max(len(name) for name in names)
    return "\n".join(f"{name.ljust(width)}  {text_value(obj.get(name))}" for name in names)


class Printer:
    def __init__(self, as_json: bool, stream: IO[str] | None = None):
        self.as_json = as_json
        self.stream = stream or sys.stdout

    def result(self, obj: dict, text: str) -> None:
        """Print the command's one result: the object as JSON, or the text."""
        print(to_json(obj) if self.as_json else text, file=self.stream, flush=True)
