"""Reading a run's JSON-lines logs (metrics.jsonl, router.jsonl).

Rows are appended one line at a time, so a process killed mid-write can leave a torn last line: it is
dropped (the resumed run logs that step again). Damage anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # torn by a kill during the append
                break
            raise ValueError(f"{path}, line {n}: not JSON; the file is damaged (remove that line to go on)") from None
    return rows
