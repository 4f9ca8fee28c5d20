"""The 2D synthetic stand-ins of `deconver synth`: GlaS H&E tiles and FIVES fundus images in their official layouts.

What each looks like and which quirks of the real layouts it carries: deconver/data/synth.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def texture(points: np.ndarray, rng: np.random.Generator, scale: float, waves: int = 4) -> np.ndarray:
    """A smooth random field in [-1, 1] (every stand-in's texture, 2D and 3D): a sum of a few plane waves evaluated at `points` (…, d)."""
    d = points.shape[-1]
    out = np.zeros(points.shape[:-1])
    for _ in range(waves):
        k = rng.normal(size=d)
        k *= 2 * math.pi / (scale * np.linalg.norm(k))
        out += np.sin(points @ k + rng.uniform(0, 2 * math.pi))
    return out / waves


# --------------------------------------------------------------------------- GlaS
def _ellipse_radius(yy, xx, rng, cy, cx, a, b, irregular: float) -> np.ndarray:
    """Normalised radius of a wobbly ellipse centred at (cy, cx): < 1 inside."""
    th = rng.uniform(0, math.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(th) + dy * math.sin(th)) / a
    v = (-dx * math.sin(th) + dy * math.cos(th)) / b
    ang = np.arctan2(v, u)
    wobble = 1 + irregular * np.sin(3 * ang + rng.uniform(0, 6)) + irregular / 2 * np.sin(5 * ang + rng.uniform(0, 6))
    return np.sqrt(u ** 2 + v ** 2) / wobble


def _glas_case(rng: np.random.Generator, malignant: bool) -> tuple[np.ndarray, np.ndarray]:
    """One H&E-like tile and its gland instance map.

    A gland is a ring of purple epithelium with scattered nuclei around a pale lumen. What keeps it from
    being a colour threshold, as in the real tiles: the stain varies from tile to tile, the stroma holds
    scattered nuclei and dense purple cell clusters with no lumen (lymphoid aggregates, not glands), the
    epithelium's colour varies within a gland, and the image is slightly out of focus and noisy.
    """
    from scipy.ndimage import gaussian_filter

    h, w = int(rng.integers(256, 321)), int(rng.integers(256, 321))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = np.stack([yy, xx], -1)
    tex = texture(pts, rng, scale=40.0)
    fine = texture(pts, rng, scale=9.0)
    stroma, epithelium = np.array([228.0, 165, 198]), np.array([168.0, 100, 172])
    lumen_rgb, nucleus = np.array([240.0, 232, 242]), np.array([95.0, 50, 128])
    img = stroma + np.stack([12 * tex, 18 * tex, 10 * tex], -1)
    inst = np.zeros((h, w), np.uint8)
    taken = np.zeros((h, w), bool)
    epithelia = np.zeros((h, w), bool)
    n_target = int(rng.integers(3, 8))
    gid = 0
    for _ in range(60):
        if gid >= n_target:
            break
        cy, cx = rng.uniform(20, h - 20), rng.uniform(20, w - 20)
        r = _ellipse_radius(yy, xx, rng, cy, cx, rng.uniform(22, 55), rng.uniform(16, 38),
                            0.22 if malignant else 0.06)
        gland = r < 1.0
        if taken[r < 1.15].any():
            continue
        gid += 1
        inst[gland] = gid
        taken |= r < 1.15
        lumen = r < rng.uniform(0.45, 0.65)
        epi = gland & ~lumen
        epithelia |= epi
        img[epi] = epithelium + 22 * fine[epi, None] * np.array([1.0, 0.8, 0.6])
        img[lumen] = lumen_rgb
    for _ in range(int(rng.integers(2, 6))):             # lymphoid aggregates: purple, no lumen, not glands
        cy, cx = rng.uniform(10, h - 10), rng.uniform(10, w - 10)
        side = rng.uniform(7, 16)
        blob = _ellipse_radius(yy, xx, rng, cy, cx, side, side * rng.uniform(0.6, 1.0), 0.15) < 1.0
        if taken[blob].any():
            continue
        taken |= blob
        img[blob] = epithelium + 22 * fine[blob, None] * np.array([1.0, 0.8, 0.6])
        img[blob & (rng.uniform(size=(h, w)) < 0.35)] = nucleus
    img[epithelia & (rng.uniform(size=(h, w)) < 0.12)] = nucleus                          # epithelial nuclei
    img[(inst == 0) & (rng.uniform(size=(h, w)) < 0.012)] = nucleus                       # stromal nuclei
    stain = rng.normal(1.0, 0.06, 3) * rng.uniform(0.9, 1.05)                            # tile-to-tile stain
    img = gaussian_filter(img * stain + rng.normal(0, 8, 3), sigma=(0.8, 0.8, 0))
    img += rng.normal(0, 7, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), inst


def write_glas(out: Path, cases: int, seed: int) -> list[str]:
    """GlaS-like tiles named train_N / testA_N / testB_N (official proportions 85:60:20) and Grade.csv."""
    from PIL import Image

    n_a = max(1, round(cases * 60 / 165))
    n_b = max(1, round(cases * 20 / 165))
    n_train = max(1, cases - n_a - n_b)
    names = ([f"train_{k + 1}" for k in range(n_train)] + [f"testA_{k + 1}" for k in range(n_a)]
             + [f"testB_{k + 1}" for k in range(n_b)])
    out.mkdir(parents=True, exist_ok=True)
    rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i])
        malignant = bool(rng.uniform() < 0.5)
        img, inst = _glas_case(rng, malignant)
        Image.fromarray(img, mode="RGB").save(out / f"{name}.bmp")
        Image.fromarray(inst, mode="L").save(out / f"{name}_anno.bmp")
        grade, sub = ("malignant", "adenocarcinoma") if malignant else ("benign", "adenomatous")
        rows.append(f"{name},{int(rng.integers(1, 40))}, {grade}, {sub}")
    (out / "Grade.csv").write_bytes(("\r".join(rows) + "\r").encode())  # CR-only, as the original
    return ["Grade.csv with leading spaces and CR-only line endings", "annotations are instance maps"]


# --------------------------------------------------------------------------- FIVES
def _draw_vessels(draw_img, draw_mask, rng, start, angle, width, steps, depth, inside, stride) -> None:
    x, y = start
    for step in range(steps):
        angle += rng.normal(0, 0.12)
        nx, ny = x + stride * math.cos(angle), y + stride * math.sin(angle)
        if not inside(nx, ny):
            return
        w = max(1, int(round(width)))
        shade = int(rng.integers(-12, 12))
        draw_img.line([(x, y), (nx, ny)], fill=(135 + shade, 32, 22), width=w)
        draw_mask.line([(x, y), (nx, ny)], fill=255, width=w)
        x, y = nx, ny
        width = max(1.0, width * 0.985)
        if depth > 0 and step > 3 and rng.uniform() < 0.09:
            side = 1 if rng.uniform() < 0.5 else -1
            _draw_vessels(draw_img, draw_mask, rng, (x, y), angle + side * rng.uniform(0.4, 0.9),
                          width * 0.7, int(steps * 0.6), depth - 1, inside, stride)


def _fives_case(rng: np.random.Generator, size: int, category: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    radius = size * 0.47
    r2 = ((xx - c) ** 2 + (yy - c) ** 2) / radius ** 2
    fundus = r2 < 1.0
    tex = texture(np.stack([yy, xx], -1), rng, scale=size / 4)
    img = np.zeros((size, size, 3))
    img[..., 0] = 200 - 70 * r2 + 10 * tex
    img[..., 1] = 85 - 35 * r2 + 6 * tex
    img[..., 2] = 35 - 15 * r2
    side = 1 if rng.uniform() < 0.5 else -1
    disc = (c + side * size * 0.27, c + rng.uniform(-0.05, 0.05) * size)
    d2 = ((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2) / (size * 0.06) ** 2
    img += np.exp(-d2)[..., None] * np.array([60, 120, 80])
    mac = ((xx - (c - side * size * 0.05)) ** 2 + (yy - c) ** 2) / (size * 0.08) ** 2
    img -= np.exp(-mac)[..., None] * np.array([40, 20, 5])
    if category == "A":   # drusen-like bright spots near the macula
        for _ in range(12):
            px, py = c - side * size * 0.05 + rng.normal(0, size * 0.05), c + rng.normal(0, size * 0.05)
            img += np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 18.0)[..., None] * np.array([40, 50, 20])
    if category == "D":   # haemorrhage-like dark blots
        for _ in range(10):
            px, py = rng.uniform(0.25, 0.75) * size, rng.uniform(0.25, 0.75) * size
            img -= np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 30.0)[..., None] * np.array([70, 40, 10])
    image = Image.fromarray(np.clip(img * fundus[..., None], 0, 255).astype(np.uint8), mode="RGB")
    mask = Image.new("L", (size, size), 0)
    di, dm = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    inside = lambda x, y: ((x - c) ** 2 + (y - c) ** 2) < (radius * 0.97) ** 2  # noqa: E731
    base_w = size / 80
    for up in (-1, 1):
        for toward, length in ((-side, 70), (side, 30)):   # temporal arcades long, nasal vessels short
            a0 = math.atan2(up, toward * 0.6)
            _draw_vessels(di, dm, rng, disc, a0 + rng.normal(0, 0.1), base_w * rng.uniform(0.85, 1.1),
                          length, 3, inside, stride=7 * size / 512)
    image = image.filter(ImageFilter.GaussianBlur(0.7))
    arr = np.asarray(image).astype(np.float64)
    arr += rng.normal(0, 3, arr.shape) * fundus[..., None]
    return np.clip(arr * fundus[..., None], 0, 255).astype(np.uint8), np.asarray(mask)


def write_fives(out: Path, cases: int, seed: int, size: int = 256) -> list[str]:
    """FIVES-like train/test folders (3:1), categories A/D/G/N, with the layout's quirks."""
    from PIL import Image

    n_test = max(1, cases // 4)
    n_train = max(1, cases - n_test)
    quirks = ["Thumbs.db in train/Original and test/Groud truth", "Quality Assessment.xlsx at the root",
              "test ground truth in 'Groud truth' (the misspelt mirror)"]
    index = 0
    for subset, count in (("train", n_train), ("test", n_test)):
        gt_name = "Ground truth" if subset == "train" else "Groud truth"
        (out / subset / "Original").mkdir(parents=True, exist_ok=True)
        (out / subset / gt_name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            rng = np.random.default_rng([seed, index])
            category = "ADGN"[k % 4]
            name = f"{k + 1}_{category}.png"
            img, mask = _fives_case(rng, size, category)
            Image.fromarray(img, mode="RGB").save(out / subset / "Original" / name)
            if index % 3 == 1:
                Image.fromarray(np.repeat(mask[..., None], 3, -1), mode="RGB").save(out / subset / gt_name / name)
                quirks.append(f"{subset}/{gt_name}/{name}: RGB mask")
            else:
                Image.fromarray(mask, mode="L").save(out / subset / gt_name / name)
            index += 1
    thumbs = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)  # an OLE header, as Windows writes them
    (out / "train" / "Original" / "Thumbs.db").write_bytes(thumbs)
    (out / "test" / "Groud truth" / "Thumbs.db").write_bytes(thumbs)
    _quality_sheet(out / "Quality Assessment.xlsx", seed)
    return quirks


def _quality_sheet(path: Path, seed: int) -> None:
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "SYNTHETIC"
    ws.append(["Disease", "Illuminaton & Color", "Blur", "Low contrast", "note"])
    ws.append(["-", 1, 1, 1, f"synthetic stand-in (seed {seed}), not the real FIVES sheet"])
    wb.save(path)
