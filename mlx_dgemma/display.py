"""A live view of the canvas settling, for terminals: committed text stays, the current draft is redrawn in place.

On a terminal the draft is drawn dimmed after the committed text and erased (by relative cursor moves, so it
survives scrolling) before the next draft or the committed canvas replaces it. When the output is not a terminal
only committed text is written.
"""

from __future__ import annotations

import shutil
import sys
import unicodedata

DIM, RESET = "\x1b[2m", "\x1b[0m"


def _width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def advance(text: str, column: int, columns: int) -> tuple[int, int]:
    """(lines moved down, final column) after writing `text` from `column` on a terminal `columns` wide."""
    lines = 0
    for ch in text:
        if ch == "\n":
            lines, column = lines + 1, 0
            continue
        w = _width(ch)
        if column + w > columns:
            lines, column = lines + 1, 0
        column += w
    return lines, column


class CanvasView:
    def __init__(self, stream=None, live: bool | None = None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.column = 0  # where committed text ends
        self.draft_lines = 0  # lines the current draft runs below the committed text
        self.drawn = False

    def _columns(self) -> int:
        return max(20, shutil.get_terminal_size((80, 24)).columns)

    def _erase(self):
        if self.drawn:
            up = f"\x1b[{self.draft_lines}A" if self.draft_lines else ""
            self.stream.write(f"{up}\r\x1b[{self.column}C" if self.column else f"{up}\r")
            self.stream.write("\x1b[J")
            self.drawn = False

    def draft(self, text: str):
        if not self.live:
            return
        self._erase()
        self.draft_lines, _ = advance(text, self.column, self._columns())
        self.stream.write(DIM + text + RESET)
        self.stream.flush()
        self.drawn = True

    def commit(self, text: str, style: str = ""):
        """Write committed text; `style` (an SGR escape such as DIM) applies on a live terminal only."""
        self._erase()
        self.stream.write(style + text + RESET if style and text and self.live else text)
        self.stream.flush()
        _, self.column = advance(text, self.column, self._columns()) if self.live else (0, 0)

    def close(self):
        self._erase()
        self.stream.flush()
