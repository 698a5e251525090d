"""The loss curve as a PNG, drawn without a plotting library (zlib + struct).

matplotlib is not a dependency of lorabot; a line chart with gridlines, numbers and a
legend needs only pixels, a 3x5 font and the PNG chunk format.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
GRID: Color = (225, 225, 225)
AXIS: Color = (60, 60, 60)
TRAIN: Color = (31, 119, 180)
EVAL: Color = (255, 127, 14)

# 3 columns x 5 rows per glyph, row by row.
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "a": "000011101101011", "e": "010101111100011", "i": "010000010010010",
    "l": "010010010010011", "n": "000110101101101", "o": "000010101101010",
    "p": "000110101110100", "r": "000101110100100", "s": "000011110011110",
    "t": "010111010010011", "v": "000101101101010", " ": "000000000000000",
}  # fmt: skip


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def dot(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            at = 3 * (y * self.width + x)
            self.pixels[at : at + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, thick: int = 1) -> None:
        """Bresenham, `thick` pixels wide."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        error = dx + dy
        while True:
            for t in range(thick):
                self.dot(x0, y0 + t, color)
            if (x0, y0) == (x1, y1):
                return
            doubled = 2 * error
            if doubled >= dy:
                error, x0 = error + dy, x0 + sx
            if doubled <= dx:
                error, y0 = error + dx, y0 + sy

    def box(self, x: int, y: int, size: int, color: Color) -> None:
        for i in range(size):
            self.line(x, y + i, x + size - 1, y + i, color)

    def text(self, x: int, y: int, text: str, color: Color = AXIS, scale: int = 2) -> None:
        for index, char in enumerate(text):
            bits = FONT.get(char, FONT[" "])
            for bit, on in enumerate(bits):
                if on == "1":
                    row, col = divmod(bit, 3)
                    for i in range(scale * scale):
                        self.dot(
                            x + index * 4 * scale + col * scale + i % scale,
                            y + row * scale + i // scale,
                            color,
                        )

    def png(self) -> bytes:
        rows = b"".join(
            b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width])
            for y in range(self.height)
        )

        def chunk(tag: bytes, data: bytes) -> bytes:
            body = tag + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b"")
        )


def number(value: float, step: float) -> str:
    """`value` with as many decimals as ticks `step` apart need to differ."""
    decimals = max(0, 1 - math.floor(math.log10(step))) if step > 0 else 2
    return f"{value:.{min(decimals, 6)}f}"


def loss_chart(
    path: Path,
    train: Sequence[tuple[int, float]],
    evals: Sequence[tuple[int, float]],
    width: int = 640,
    height: int = 360,
) -> None:
    """Train loss per step (blue) and held-out loss (orange) against the step."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 56, width - 16, 16, height - 40
    points = [*train, *evals]
    if not points:
        path.write_bytes(canvas.png())
        return
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    x_lo, x_hi = min(0, *steps), max(max(steps), 1)
    y_lo, y_hi = min(losses), max(losses)
    pad = (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = max(0.0, y_lo - pad), y_hi + pad

    def xy(step: float, loss: float) -> tuple[int, int]:
        x = left + (step - x_lo) / (x_hi - x_lo) * (right - left)
        y = bottom - (loss - y_lo) / (y_hi - y_lo) * (bottom - top)
        return round(x), round(y)

    for i in range(5):
        value = y_lo + (y_hi - y_lo) * i / 4
        _, y = xy(x_lo, value)
        canvas.line(left, y, right, y, GRID)
        canvas.text(4, y - 5, number(value, (y_hi - y_lo) / 4))
    for step in sorted({round(x_lo + (x_hi - x_lo) * i / 4) for i in range(5)}):
        x, _ = xy(step, y_lo)
        canvas.line(x, top, x, bottom, GRID)
        canvas.text(x - 4 * len(str(step)), bottom + 6, str(step))
    canvas.line(left, top, left, bottom, AXIS)
    canvas.line(left, bottom, right, bottom, AXIS)
    canvas.text(right - 40, bottom + 22, "step")
    for series, color in ((train, TRAIN), (evals, EVAL)):
        drawn = [xy(s, v) for s, v in series]
        for (x0, y0), (x1, y1) in zip(drawn, drawn[1:], strict=False):
            canvas.line(x0, y0, x1, y1, color, thick=2)
        if color == EVAL or len(drawn) == 1:
            for x, y in drawn:
                canvas.box(x - 2, y - 2, 5, color)
    canvas.box(right - 120, top + 4, 8, TRAIN)
    canvas.text(right - 108, top + 3, "train")
    canvas.box(right - 120, top + 18, 8, EVAL)
    canvas.text(right - 108, top + 17, "eval")
    path.write_bytes(canvas.png())
