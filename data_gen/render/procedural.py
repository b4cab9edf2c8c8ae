"""An offline, deterministic portrait renderer: stylised head-and-shoulders drawings with PIL.

Every visual attribute in `data_gen.attributes.VISUAL_ATTRIBUTES` is drawn so that it stays
visible whatever the other attributes are: hair colour also colours the always-visible eyebrows
(so it shows on bald heads and under hats), every hair style has a feature outside the area a
hat covers (temples, curtains, puffs, a tail, or a bun or crest above the hat), sunglasses are
tinted glass that lets the eye colour through, and so on.

A figure is described in "units": the image spans [-1, 1] in x and y (y points down) at view
scale 1. Every shape is a polygon or a line whose points go through the view's affine transform
(scale, tilt, offset) before PIL fills them on a supersampled canvas, which is then box-reduced
to the target size; lighting and Gaussian noise are applied last, in numpy.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_gen.personas import Persona, ViewSpec

Color = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------
# Palettes (fixed per attribute value; hats and accessories have fixed colours per kind).

SKIN: dict[str, Color] = {
    "porcelain": (248, 224, 210),
    "fair": (236, 196, 164),
    "olive": (200, 160, 110),
    "tan": (196, 138, 92),
    "brown": (146, 96, 62),
    "deep": (92, 58, 38),
}
HAIR: dict[str, Color] = {
    "black": (28, 24, 24),
    "brown": (106, 64, 32),
    "blonde": (232, 196, 100),
    "red": (186, 66, 28),
    "grey": (172, 172, 176),
    "blue": (40, 90, 220),
    "green": (40, 160, 70),
    "pink": (240, 100, 170),
}
EYES: dict[str, Color] = {
    "brown": (96, 52, 20),
    "blue": (40, 120, 230),
    "green": (40, 160, 60),
    "hazel": (170, 130, 40),
    "grey": (150, 160, 172),
}
CLOTHES: dict[str, Color] = {
    "red": (200, 40, 40),
    "orange": (240, 130, 30),
    "yellow": (236, 204, 50),
    "green": (60, 150, 60),
    "teal": (30, 140, 140),
    "blue": (40, 70, 170),
    "purple": (120, 60, 160),
    "pink": (236, 130, 170),
    "black": (34, 34, 38),
    "white": (240, 240, 236),
}
_GREY_BROW: Color = (215, 215, 215)
_DARK: Color = (24, 22, 24)
_GOLD: Color = (236, 190, 40)
_WHITE: Color = (250, 250, 250)
_CAP: Color = (44, 74, 150)
_BEANIE: Color = (140, 36, 56)
_HEADBAND: Color = (245, 245, 245)
_HEADBAND_STRIPE: Color = (220, 40, 40)
_FEDORA: Color = (110, 88, 66)
_SCARF: Color = (232, 220, 186)
_SCARF_STRIPE: Color = (150, 40, 40)
_LIPS: Color = (196, 62, 88)
_SHIRT_UNDER: Color = (226, 232, 242)  # Under a suit jacket.

_ARCH = {"feminine": 0.0, "androgynous": 0.5, "masculine": 1.0}


def _mix(a: Color, b: Color, t: float) -> Color:
    """(1 - t) * a + t * b."""
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _shade(c: Color, f: float) -> Color:
    return tuple(int(min(255, round(x * f))) for x in c)  # type: ignore[return-value]


def _contrast(c: Color, t: float = 0.45) -> Color:
    """A clearly different tone of `c`: lighter for dark colours, darker for light ones."""
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return _mix(c, (255, 255, 255) if lum < 140 else (20, 20, 20), t)


# ---------------------------------------------------------------------------------------------
# Geometry helpers (all in units, before the view transform).


def _circle_table(n: int) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(a), np.sin(a)], 1)


_C12, _C20, _C32 = _circle_table(12), _circle_table(20), _circle_table(32)


def _ellipse(cx, cy, rx, ry, n=20, angle=0.0) -> np.ndarray:
    table = {12: _C12, 20: _C20, 32: _C32}.get(n)
    if table is None:
        table = _circle_table(n)
    pts = table * (rx, ry)
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        pts = pts @ np.array([[c, s], [-s, c]])
    return pts + (cx, cy)


def _arc(cx, cy, rx, ry, start_deg, end_deg, n=12) -> np.ndarray:
    a = np.radians(np.linspace(start_deg, end_deg, n))
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


def _head_outline(rx: float, ry: float, arch: float, a: np.ndarray | None = None) -> np.ndarray:
    """Head outline around (0, 0): a squarer jaw for masculine, a pointed chin for feminine.

    `a` are the angles of the points (clockwise from +x, as y points down); a full turn by default.
    """
    if a is None:
        a = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    c, s = np.cos(a), np.sin(a)
    lower = s > 0
    n = 2.0 + 1.6 * arch  # Superellipse exponent of the lower half (2 = ellipse).
    x = rx * c
    y = ry * s
    xl = rx * np.sign(c) * np.abs(c) ** (2 / n)
    yl = ry * np.abs(s) ** (2 / n)
    taper = 1 - 0.22 * (1 - arch) * s**2  # Narrower towards the chin.
    x = np.where(lower, xl * taper, x)
    y = np.where(lower, yl, y)
    return np.stack([x, y], 1)


class _Canvas:
    """Records unit-space shapes; `replay` draws them through a view transform.

    A persona's drawing is recorded once (it does not depend on the view) and replayed for each
    view: one matrix product transforms every point of the drawing at once.
    """

    def __init__(self):
        self._points: list[np.ndarray] = []
        self._ops: list[tuple] = []  # (is_line, start, end, fill, outline, width)
        self._n = 0

    def _add(self, pts, is_line, fill, outline, width):
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        self._points.append(pts)
        self._ops.append((is_line, self._n, self._n + len(pts), fill, outline, width))
        self._n += len(pts)

    def poly(self, pts, fill, outline=None, width=0.0):
        self._add(pts, False, fill, outline, width)

    def ellipse(self, cx, cy, rx, ry, fill, n=20, angle=0.0, outline=None, width=0.0):
        self.poly(_ellipse(cx, cy, rx, ry, n, angle), fill, outline, width)

    def line(self, pts, fill, width):
        self._add(pts, True, fill, None, width)

    def freeze(self) -> tuple[np.ndarray, tuple]:
        return np.concatenate(self._points), tuple(self._ops)


def _replay(image: Image.Image, drawing, matrix: np.ndarray, shift: np.ndarray, px: float):
    """Draws a recorded drawing; `matrix`, `shift` map units to pixels, `px` is pixels/unit."""
    points, ops = drawing
    xy = (points @ matrix.T + shift).ravel().tolist()
    draw = ImageDraw.Draw(image, "RGBA")  # RGBA fills blend onto the RGB canvas.
    for is_line, start, end, fill, outline, width in ops:
        seg = xy[2 * start:2 * end]
        w = max(1, int(round(width * px)))
        if is_line:
            draw.line(seg, fill=fill, width=w, joint="curve")
            continue
        draw.polygon(seg, fill=fill)
        if outline is not None:
            draw.line(seg + seg[:2], fill=outline, width=w, joint="curve")


@functools.lru_cache(maxsize=512)
def _drawing(attrs: tuple[tuple[str, str], ...]):
    canvas = _Canvas()
    _draw_portrait(canvas, dict(attrs))
    return canvas.freeze()


# ---------------------------------------------------------------------------------------------
# The portrait.

_HX, _HY = 0.0, -0.14  # Head centre.
_HRY = 0.37  # Head half-height.
_EYE_Y = _HY + 0.0
_EYE_DX = 0.125
_BROW_Y = _HY - 0.105
_BRIM_Y = _HY - 0.215  # Lower edge of hat crowns (forehead).
_MOUTH_Y = _HY + 0.19
_PIVOT = np.array([0.0, 0.1])  # Views rotate and scale about the neck.
_ZOOM = 1.1  # Figure units to image half-sizes at view scale 1.
_PIVOT_AT = np.array([0.0, 0.18])  # Where the pivot lands in the image (before the offset).


def _draw_portrait(cv: _Canvas, a: dict[str, str]) -> None:
    arch = _ARCH[a["gender_presentation"]]
    skin = SKIN[a["skin_tone"]]
    skin_dark = _shade(skin, 0.8)
    line_col = _shade(skin, 0.55)
    hair = HAIR[a["hair_colour"]]
    style = a["hair_style"]
    age = a["age_band"]
    brow = _mix(hair, _GREY_BROW, {"young adult": 0.0, "middle-aged": 0.2, "senior": 0.55}[age])
    cloth = CLOTHES[a["clothing_colour"]]
    rx = 0.265 + 0.04 * arch
    ry = _HRY
    neck_w = 0.095 + 0.04 * arch
    shoulder_w = 0.64 + 0.22 * arch
    shoulder_y = 0.56 - 0.08 * arch

    # Back hair (behind the head and the torso).
    if style == "long":
        back = np.concatenate([
            _arc(_HX, _HY, rx + 0.075, ry + 0.05, 180, 360, 12),
            [[rx + 0.1, 0.25], [rx + 0.13, 0.5], [rx - 0.05, 0.5], [0, 0.3],
             [-rx + 0.05, 0.5], [-rx - 0.13, 0.5], [-rx - 0.1, 0.25]],
        ])
        cv.poly(back, hair)
    elif style == "curly":
        for deg in range(150, 400, 22):
            r = math.radians(deg)
            cv.ellipse(_HX + (rx + 0.06) * math.cos(r), _HY + (ry + 0.03) * math.sin(r),
                       0.1, 0.1, hair, n=12)
        for deg in range(160, 390, 45):
            r = math.radians(deg)
            cv.ellipse(_HX + (rx + 0.09) * math.cos(r), _HY + (ry + 0.06) * math.sin(r),
                       0.04, 0.04, _shade(hair, 0.7), n=12)
    elif style == "ponytail":
        tail = [[rx * 0.55, _HY - ry * 0.75], [rx + 0.12, _HY - 0.2], [rx + 0.2, _HY + 0.1],
                [rx + 0.16, 0.42], [rx + 0.1, 0.46], [rx + 0.06, _HY + 0.15], [rx * 0.6, _HY]]
        cv.poly(tail, hair, outline=_shade(hair, 0.7), width=0.015)
        cv.ellipse(rx + 0.09, _HY - 0.24, 0.045, 0.03, _DARK, n=12, angle=0.6)
    elif style == "bun":
        cv.ellipse(_HX, _HY - ry - 0.1, 0.12, 0.11, hair, n=20,
                   outline=_shade(hair, 0.7), width=0.015)
        cv.line(_arc(_HX, _HY - ry - 0.1, 0.06, 0.05, 200, 470, 10), _shade(hair, 0.65), 0.02)

    # Neck, torso and clothing.
    cv.poly([[-neck_w, _HY + 0.1], [neck_w, _HY + 0.1], [neck_w, 0.5], [-neck_w, 0.5]],
            _shade(skin, 0.88))
    _draw_clothes(cv, a["clothing_style"], cloth, skin, neck_w, shoulder_w, shoulder_y)
    _draw_neck_accessory(cv, a["accessory"], neck_w)

    # Ears, head, face.
    for side in (-1, 1):
        cv.ellipse(side * rx, _HY + 0.02, 0.05, 0.08, skin_dark, n=12)
    head = _head_outline(rx, ry, arch) + (_HX, _HY)
    cv.poly(head, skin)
    if style == "bald":  # Scalp shine.
        cv.ellipse(_HX - 0.08, _HY - ry + 0.08, 0.07, 0.035, _mix(skin, _WHITE, 0.45), n=12)
    _draw_face(cv, a, arch, skin, line_col, brow, rx, ry)

    # Front hair, hats, earrings.
    _draw_front_hair(cv, style, hair, skin, rx, ry)
    _draw_hat(cv, a["headwear"], rx, ry)
    if a["accessory"] == "earrings":
        for side in (-1, 1):
            x = side * (rx + 0.012)
            cv.line([[x, _HY + 0.07], [x, _HY + 0.12]], _GOLD, 0.018)
            cv.ellipse(x, _HY + 0.15, 0.032, 0.036, _GOLD, n=12, outline=_shade(_GOLD, 0.6),
                       width=0.012)


def _draw_face(cv, a, arch, skin, line_col, brow, rx, ry) -> None:
    age = a["age_band"]
    # Age lines (forehead, under-eye, nose-to-mouth; crow's feet and neck lines for seniors).
    if age != "young adult":
        n_lines = 2 if age == "middle-aged" else 3
        for k in range(n_lines):
            y = _BROW_Y - 0.05 - 0.035 * k
            cv.line(_arc(0, y + 0.3, 0.2, 0.3, 238, 302, 7), line_col, 0.025)
        for side in (-1, 1):
            cv.line([[side * 0.085, _HY + 0.13], [side * 0.115, _HY + 0.2],
                     [side * 0.105, _MOUTH_Y + 0.05]], line_col, 0.025)
            cv.line(_arc(side * _EYE_DX, _EYE_Y + 0.03, 0.06, 0.04, 30, 150, 5), line_col, 0.018)
    if age == "senior":
        for side in (-1, 1):
            x0 = side * (_EYE_DX + 0.1)
            for dy in (-0.03, 0.0, 0.03):
                cv.line([[x0, _EYE_Y + dy * 0.5], [x0 + side * 0.045, _EYE_Y + dy * 1.6]],
                        line_col, 0.016)
            cv.line([[side * 0.16, _HY + 0.25], [side * 0.13, _HY + 0.33]], line_col, 0.02)
        for y in (_HY + ry + 0.1, _HY + ry + 0.15):
            cv.line(_arc(0, y - 0.1, 0.07, 0.1, 60, 120, 5), line_col, 0.016)

    # Eyes: white, iris (eye colour), pupil, and eyelashes for feminine faces.
    iris = EYES[a["eye_colour"]]
    for side in (-1, 1):
        x = side * _EYE_DX
        cv.ellipse(x, _EYE_Y, 0.085, 0.058, _WHITE, n=20)
        cv.ellipse(x, _EYE_Y, 0.052, 0.052, iris, n=20)
        cv.ellipse(x, _EYE_Y, 0.02, 0.02, _DARK, n=12)
        cv.line(_arc(x, _EYE_Y + 0.01, 0.09, 0.07, 200, 340, 7), _shade(skin, 0.45), 0.02)
        if arch < 0.25:
            cv.line([[x + side * 0.08, _EYE_Y - 0.03], [x + side * 0.115, _EYE_Y - 0.06]],
                    _DARK, 0.02)
    # Eyebrows in hair colour: always visible, above any glasses and below any hat.
    brow_h = 0.034 + 0.014 * arch
    for side in (-1, 1):
        x = side * _EYE_DX
        pts = [[x - side * 0.075, _BROW_Y + 0.015], [x, _BROW_Y - brow_h / 2],
               [x + side * 0.085, _BROW_Y + 0.01], [x + side * 0.08, _BROW_Y + 0.01 + brow_h],
               [x, _BROW_Y + brow_h / 2], [x - side * 0.075, _BROW_Y + 0.015 + brow_h]]
        cv.poly(pts, brow)
    # Nose and mouth.
    cv.line([[0.0, _HY + 0.04], [0.03, _HY + 0.11], [-0.01, _HY + 0.12]], line_col, 0.02)
    if arch < 0.25:
        cv.ellipse(0, _MOUTH_Y, 0.075, 0.03, _LIPS, n=20)
        cv.line([[-0.07, _MOUTH_Y], [0.07, _MOUTH_Y]], _shade(_LIPS, 0.6), 0.012)
    else:
        cv.line(_arc(0, _MOUTH_Y - 0.04, 0.075, 0.045, 30, 150, 6), _shade(skin, 0.45), 0.022)

    # Facial hair, in the eyebrow colour.
    fh = a["facial_hair"]
    hair = brow
    if fh == "beard":
        jaw = _head_outline(rx * 1.06, ry * 1.12, arch, np.linspace(-0.05, np.pi + 0.05, 16))
        cheeks = [[-rx * 0.9, _HY + 0.11], [-0.1, _MOUTH_Y - 0.07], [0, _MOUTH_Y - 0.075],
                  [0.1, _MOUTH_Y - 0.07], [rx * 0.9, _HY + 0.11]]
        cv.poly(np.concatenate([jaw + (_HX, _HY), cheeks]), hair)
        cv.ellipse(0, _MOUTH_Y, 0.07, 0.028, _shade(skin, 0.5), n=12)
    elif fh == "moustache":
        cv.poly([[-0.12, _MOUTH_Y + 0.02], [-0.1, _MOUTH_Y - 0.05], [0, _MOUTH_Y - 0.07],
                 [0.1, _MOUTH_Y - 0.05], [0.12, _MOUTH_Y + 0.02], [0.07, _MOUTH_Y - 0.015],
                 [0, _MOUTH_Y - 0.025], [-0.07, _MOUTH_Y - 0.015]], hair)
    elif fh == "goatee":
        chin = _HY + ry
        cv.poly([[-0.07, _MOUTH_Y + 0.04], [0.07, _MOUTH_Y + 0.04], [0.06, chin + 0.02],
                 [0, chin + 0.05], [-0.06, chin + 0.02]], hair)
        for side in (-1, 1):
            cv.line([[side * 0.08, _MOUTH_Y - 0.04], [side * 0.09, _MOUTH_Y + 0.04]], hair,
                    0.025)

    # Eyewear.
    ew = a["eyewear"]
    if ew == "none":
        return
    frame = (20, 20, 24) if ew != "square glasses" else (90, 46, 20)
    lens = (12, 14, 28, 150) if ew == "sunglasses" else (255, 255, 255, 60)
    for side in (-1, 1):
        x = side * _EYE_DX
        if ew == "square glasses":
            pts = [[x - 0.095, _EYE_Y - 0.07], [x + 0.095, _EYE_Y - 0.07],
                   [x + 0.095, _EYE_Y + 0.065], [x - 0.095, _EYE_Y + 0.065]]
        else:
            pts = _ellipse(x, _EYE_Y, 0.09, 0.08 if ew == "sunglasses" else 0.088, n=20)
        cv.poly(pts, lens, outline=frame, width=0.024 if ew != "round glasses" else 0.018)
        cv.line([[side * (_EYE_DX + 0.09), _EYE_Y - 0.02], [side * (rx + 0.01), _EYE_Y - 0.04]],
                frame, 0.02)
    cv.line(_arc(0, _EYE_Y, 0.04, 0.03, 200, 340, 5), frame, 0.02)


def _draw_front_hair(cv, style, hair, skin, rx, ry) -> None:
    """The hair on the head: a cap with a style-specific hairline, then crests and fringes."""
    if style == "bald":
        return
    top = _arc(_HX, _HY, 1.0, 1.0, 180, 360, 16)
    if style == "buzz cut":
        color, scale = _mix(skin, hair, 0.6), 1.01
        hairline = [[rx, _HY - 0.03], [0.17, _HY - 0.24], [0, _HY - 0.27], [-0.17, _HY - 0.24],
                    [-rx, _HY - 0.03]]
    elif style == "mohawk":
        color, scale = _mix(skin, hair, 0.22), 1.0  # Shaved sides.
        hairline = [[rx, _HY - 0.03], [0.17, _HY - 0.24], [0, _HY - 0.27], [-0.17, _HY - 0.24],
                    [-rx, _HY - 0.03]]
    elif style == "short":
        color, scale = hair, 1.06
        hairline = [[rx * 1.05, _HY + 0.02], [rx * 0.85, _HY - 0.17], [0.1, _HY - 0.2],
                    [-0.08, _HY - 0.155], [-rx * 0.8, _HY - 0.13], [-rx * 1.05, _HY + 0.02]]
    elif style == "long":
        color, scale = hair, 1.07
        hairline = [[rx * 1.07, _HY + 0.12], [rx * 0.8, _HY - 0.12], [0.12, _HY - 0.22],
                    [0, _HY - 0.3], [-0.12, _HY - 0.22], [-rx * 0.8, _HY - 0.12],
                    [-rx * 1.07, _HY + 0.12]]
    elif style == "curly":
        color, scale = hair, 1.08
        hairline = [[rx * 1.08, _HY + 0.05], [rx * 0.7, _HY - 0.19], [0, _HY - 0.24],
                    [-rx * 0.7, _HY - 0.19], [-rx * 1.08, _HY + 0.05]]
    else:  # Ponytail and bun: hair slicked back.
        color, scale = hair, 1.02
        hairline = [[rx * 1.02, _HY - 0.01], [0.2, _HY - 0.23], [0, _HY - 0.27],
                    [-0.2, _HY - 0.23], [-rx * 1.02, _HY - 0.01]]
    cap = np.concatenate([top * (rx * scale, ry * scale + 0.01) + (_HX, _HY), hairline])
    cv.poly(cap, color)
    if style == "curly":
        for k in range(-2, 3):
            cv.ellipse(k * 0.1, _HY - 0.22 + 0.02 * abs(k), 0.055, 0.05, hair, n=12)
        for k in (-1.5, -0.5, 0.5, 1.5):
            cv.ellipse(k * 0.1, _HY - 0.3, 0.025, 0.025, _shade(hair, 0.7), n=12)
    elif style == "short":
        cv.line([[rx * 0.5, _HY - ry * 0.9], [0.05, _HY - 0.21]], _shade(hair, 0.75), 0.015)
    elif style in ("ponytail", "bun"):
        for dx in (-0.1, 0.0, 0.1):
            cv.line([[dx, _HY - 0.26], [dx * 1.3, _HY - ry]], _shade(hair, 0.8), 0.012)
    elif style == "long":
        cv.line([[0, _HY - 0.3], [0, _HY - ry - 0.02]], _shade(hair, 0.7), 0.015)
    elif style == "mohawk":
        crest = [[-0.07, _HY - 0.25], [-0.1, _HY - ry - 0.12], [-0.055, _HY - ry - 0.08],
                 [-0.06, _HY - ry - 0.22], [-0.015, _HY - ry - 0.13], [0, _HY - ry - 0.26],
                 [0.015, _HY - ry - 0.13], [0.06, _HY - ry - 0.22], [0.055, _HY - ry - 0.08],
                 [0.1, _HY - ry - 0.12], [0.07, _HY - 0.25]]
        cv.poly(crest, hair, outline=_shade(hair, 0.7), width=0.012)


def _draw_hat(cv, headwear, rx, ry) -> None:
    if headwear == "none":
        return
    yb = _BRIM_Y
    if headwear == "baseball cap":
        dome = _arc(_HX, yb, rx * 1.1, yb - (_HY - ry - 0.05), 180, 360, 14)
        cv.poly(dome, _CAP)
        cv.line([[0, yb - 0.01], [0, _HY - ry - 0.04]], _shade(_CAP, 0.7), 0.015)
        cv.ellipse(0, _HY - ry - 0.045, 0.03, 0.02, _shade(_CAP, 0.7), n=12)
        bill = _arc(_HX, yb - 0.005, rx * 1.35, 0.085, 0, 180, 12)
        cv.poly(bill, _shade(_CAP, 0.7), outline=_shade(_CAP, 0.45), width=0.014)
    elif headwear == "beanie":
        cv.ellipse(0, _HY - ry - 0.13, 0.065, 0.06, _mix(_BEANIE, _WHITE, 0.7), n=12)
        dome = _arc(_HX, yb - 0.04, rx * 1.1, yb - 0.04 - (_HY - ry - 0.09), 180, 360, 14)
        cv.poly(dome, _BEANIE)
        cuff = [[-rx * 1.14, yb - 0.11], [rx * 1.14, yb - 0.11], [rx * 1.14, yb + 0.015],
                [-rx * 1.14, yb + 0.015]]
        cv.poly(cuff, _shade(_BEANIE, 0.85))
        for k in range(-4, 5):
            x = k * rx * 0.25
            cv.line([[x, yb - 0.1], [x, yb + 0.005]], _shade(_BEANIE, 0.6), 0.014)
    elif headwear == "headband":
        band = np.concatenate([_arc(0, _HY + 0.05, rx * 1.06, 0.28, 200, 340, 10),
                               _arc(0, _HY + 0.05, rx * 1.06, 0.2, 340, 200, 10)])
        cv.poly(band, _HEADBAND)
        cv.line(_arc(0, _HY + 0.05, rx * 1.04, 0.24, 203, 337, 10), _HEADBAND_STRIPE, 0.022)
    elif headwear == "fedora":
        top = _HY - ry - 0.15
        crown = [[-rx * 0.9, yb], [-rx * 0.82, top + 0.05], [-0.09, top], [0, top + 0.05],
                 [0.09, top], [rx * 0.82, top + 0.05], [rx * 0.9, yb]]
        cv.poly(crown, _FEDORA)
        cv.poly([[-rx * 0.89, yb - 0.075], [rx * 0.89, yb - 0.075], [rx * 0.9, yb],
                 [-rx * 0.9, yb]], (32, 26, 22))
        cv.ellipse(0, yb, rx * 1.65, 0.055, _shade(_FEDORA, 0.85), n=32,
                   outline=_shade(_FEDORA, 0.6), width=0.012)


def _draw_clothes(cv, style, cloth, skin, neck_w, shoulder_w, shoulder_y) -> None:
    neck_skin = _shade(skin, 0.88)
    dark = _shade(cloth, 0.65) if sum(cloth) > 150 else _mix(cloth, _WHITE, 0.3)
    nb = 0.37  # Neck base.
    inner = neck_w + 0.04
    corner = 0.16  # Shoulder rounding radius.
    right = np.concatenate([
        [[inner, nb]],
        _arc(shoulder_w - corner, shoulder_y + corner, corner, corner, 270, 360, 6),
        [[shoulder_w, 1.8]],
    ])
    torso = np.concatenate([right, right[::-1] * (-1, 1)])
    cv.poly(torso, cloth)
    if style == "striped sweater":
        stripe = _contrast(cloth, 0.55)
        corner = 0.16
        for k in range(7):
            ys = shoulder_y + 0.06 + 0.12 * k + np.linspace(0, 0.06, 4)
            dy = np.clip(shoulder_y + corner - ys, 0, corner)
            xs = shoulder_w - corner + np.sqrt(corner**2 - dy**2)
            right = np.stack([xs, ys], 1)
            cv.poly(np.concatenate([right, right[::-1] * (-1, 1)]), stripe)
        cv.ellipse(0, nb + 0.005, neck_w + 0.035, 0.06, neck_skin, n=20)
        cv.line(_arc(0, nb + 0.005, neck_w + 0.045, 0.07, 0, 180, 10), dark, 0.03)
    elif style == "t-shirt":
        cv.ellipse(0, nb + 0.01, neck_w + 0.03, 0.075, neck_skin, n=20)
        cv.line(_arc(0, nb + 0.01, neck_w + 0.04, 0.085, 0, 180, 10), dark, 0.022)
        for side in (-1, 1):
            cv.line([[side * (shoulder_w - 0.12), shoulder_y - 0.02],
                     [side * (shoulder_w - 0.05), shoulder_y + 0.3]], dark, 0.014)
    elif style == "hoodie":
        cv.ellipse(0, nb + 0.01, neck_w + 0.14, 0.12, dark, n=20)
        cv.ellipse(0, nb + 0.0, neck_w + 0.01, 0.06, neck_skin, n=20)
        for side in (-1, 1):
            cv.line([[side * 0.06, nb + 0.08], [side * 0.07, nb + 0.34]], _WHITE, 0.02)
            cv.ellipse(side * 0.07, nb + 0.35, 0.015, 0.025, _shade(_WHITE, 0.8), n=12)
        cv.line([[-0.2, 0.92], [0.2, 0.92]], dark, 0.02)
    elif style == "collared shirt":
        cv.poly([[-neck_w, nb - 0.02], [neck_w, nb - 0.02], [0, nb + 0.12]], neck_skin)
        cv.line([[0, nb + 0.12], [0, 1.2]], dark, 0.014)
        for k in range(4):
            cv.ellipse(0.025, nb + 0.2 + 0.13 * k, 0.016, 0.016, dark, n=12)
        for side in (-1, 1):
            cv.poly([[side * (neck_w + 0.02), nb - 0.05], [side * 0.01, nb + 0.12],
                     [side * (neck_w + 0.1), nb + 0.14]], _contrast(cloth, 0.2),
                    outline=dark, width=0.012)
    elif style == "suit jacket":
        v_bottom = shoulder_y + 0.42
        cv.poly([[-neck_w - 0.03, nb - 0.01], [neck_w + 0.03, nb - 0.01], [0, v_bottom]],
                _SHIRT_UNDER)
        cv.poly([[-neck_w * 0.6, nb - 0.02], [neck_w * 0.6, nb - 0.02], [0, nb + 0.07]],
                neck_skin)
        for side in (-1, 1):
            lapel = [[side * (neck_w + 0.04), nb - 0.01], [side * 0.02, v_bottom],
                     [side * 0.09, v_bottom - 0.12], [side * (neck_w + 0.08), nb + 0.18],
                     [side * (neck_w + 0.12), nb + 0.14], [side * (neck_w + 0.1), nb + 0.03]]
            cv.poly(lapel, _shade(cloth, 0.8), outline=dark, width=0.012)
        cv.ellipse(0.03, v_bottom + 0.08, 0.022, 0.022, (20, 20, 20), n=12)
        cv.line([[0, v_bottom], [0, 1.3]], dark, 0.012)


def _draw_neck_accessory(cv, accessory, neck_w) -> None:
    nb = 0.37
    if accessory == "necklace":
        cv.line(_arc(0, nb - 0.05, neck_w + 0.07, 0.21, 10, 170, 12), _GOLD, 0.02)
        cv.poly([[0, nb + 0.14], [0.035, nb + 0.19], [0, nb + 0.24], [-0.035, nb + 0.19]],
                _GOLD, outline=_shade(_GOLD, 0.6), width=0.01)
    elif accessory == "scarf":
        wrap = [[-neck_w - 0.07, nb - 0.1], [neck_w + 0.07, nb - 0.1], [neck_w + 0.1, nb + 0.06],
                [0, nb + 0.1], [-neck_w - 0.1, nb + 0.06]]
        cv.poly(wrap, _SCARF, outline=_shade(_SCARF, 0.7), width=0.012)
        tail = [[neck_w - 0.02, nb + 0.02], [neck_w + 0.1, nb + 0.02], [neck_w + 0.12, nb + 0.45],
                [neck_w, nb + 0.45]]
        cv.poly(tail, _SCARF, outline=_shade(_SCARF, 0.7), width=0.012)
        for k in range(3):
            y = nb + 0.12 + 0.1 * k
            cv.line([[neck_w - 0.01, y], [neck_w + 0.105, y]], _SCARF_STRIPE, 0.025)
        cv.line([[-neck_w - 0.07, nb - 0.03], [neck_w + 0.07, nb - 0.03]], _SCARF_STRIPE, 0.025)
    elif accessory == "bow tie":
        y = nb + 0.015
        bow = (28, 28, 34)
        cv.poly([[0, y], [-0.11, y - 0.055], [-0.11, y + 0.055]], bow)
        cv.poly([[0, y], [0.11, y - 0.055], [0.11, y + 0.055]], bow)
        cv.ellipse(0, y, 0.03, 0.03, (90, 90, 100), n=12)


# ---------------------------------------------------------------------------------------------


def _supersample(size: int) -> int:
    """Supersampling factor: about 192 px of canvas for small images, 2x for large ones."""
    return int(min(4, max(2, round(192 / size))))


class ProceduralRenderer:
    """Renders (persona, view) pairs as stylised portraits; deterministic and CPU-only."""

    def __init__(self, image_size: int):
        if not 8 <= int(image_size) <= 1024:
            raise ValueError(f"image_size={image_size!r}: must be between 8 and 1024 pixels")
        self.image_size = int(image_size)
        self.factor = _supersample(self.image_size)

    def render(self, items: Sequence[tuple[Persona, ViewSpec]]) -> list[np.ndarray]:
        return [self.render_one(persona.attributes, view) for persona, view in items]

    def render_one(self, attrs: dict[str, str], view: ViewSpec) -> np.ndarray:
        size, k = self.image_size, self.factor
        big = size * k
        # Background: the view's colour with a vertical shading (lighter at the top).
        t = np.linspace(0.5, -0.5, big, dtype=np.float32) * (view.background_gradient * 0.6)
        column = np.clip(np.asarray(view.background, np.float32)[None, :] * (1 + t[:, None]),
                         0, 255).astype(np.uint8)
        canvas = Image.fromarray(column[:, None, :]).resize((big, big), Image.NEAREST)
        # View transform: scale and tilt about the pivot, then shift.
        half = big / 2
        theta = math.radians(view.tilt_degrees)
        c, s = math.cos(theta), math.sin(theta)
        m = half * _ZOOM * view.scale * np.array([[c, -s], [s, c]])
        centre = half + half * _PIVOT_AT + np.asarray(view.offset) * big
        shift = centre - m @ _PIVOT
        _replay(canvas, _drawing(tuple(sorted(attrs.items()))), m, shift,
                half * _ZOOM * view.scale)
        if k > 1:
            canvas = canvas.reduce(k)
        image = np.asarray(canvas, dtype=np.float32)
        if view.light != 1.0:
            image = image * np.float32(view.light)
        if view.noise_std > 0:
            rng = np.random.default_rng(view.noise_seed)
            image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(
                view.noise_std)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)
