"""Offline synthetic anomaly-detection data in the MVTec layout (numpy + PIL only).

Why: the real datasets cannot be downloaded here, yet the whole pipeline (conversion,
training, scoring, metrics) needs data with exact ground truth. Two procedural textures
and two objects (one grayscale) are rendered with natural variation between normal
images (texture phase/colour, object pose, lighting, sensor noise); test images carry
small defects — scratches, stains, holes, missing parts, cut-paste — with exact masks.

Layout written under ``out`` (the MVTec layout plus foreground masks):

    <cls>/train/good/000.png
    <cls>/test/good/000.png, <cls>/test/<defect>/000.png
    <cls>/ground_truth/<defect>/000_mask.png          (0/255)
    <cls>/fg_mask/train/good/000.png                  (objects only, 0/255, same name as the image)
    dataset_info.json   {"textures", "objects", "generator": "cdvm synthetic", "seed", ...}

``setup_train_dataset.py --data_path OUT`` picks the foreground masks up by itself.
Same seed → byte-identical files; each image has its own random stream, so a class
subset or a different ``n_train`` leaves the other images unchanged.

Usage: ``python -m datasets.synthetic --out data/synthetic --seed 0``
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_NAME = "cdvm synthetic"
FG_MASK_SUBDIR = ("fg_mask", "train", "good")  # <out>/<cls>/fg_mask/train/good/<name>.png


@dataclass
class Scene:
    img: np.ndarray             # H×W×3 float32 in [0, 1]
    fg: np.ndarray | None       # H×W bool object mask (objects only)
    bg: np.ndarray | None       # H×W×3 background without the object (objects only)


# ----------------------------------------------------------------------------- helpers

def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:S, 0:S].astype(np.float32)
    return x, y


def _value_noise(rng: np.random.Generator, S: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Smooth fractal noise in [0, 1]: random lattices upsampled bicubically (PIL), summed."""
    out = np.zeros((S, S), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        n = max(2, cells * 2 ** o)
        lattice = rng.random((n + 1, n + 1), dtype=np.float32)
        up = np.asarray(Image.fromarray(lattice, mode="F").resize((S, S), Image.BICUBIC), np.float32)
        out += amp * up
        total += amp
        amp *= 0.5
    out /= total
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _lighting(rng: np.random.Generator, S: int, strength: float = 0.12) -> np.ndarray:
    """Global brightness × a linear gradient in a random direction (uneven illumination)."""
    x, y = _grid(S)
    a = rng.uniform(0, 2 * math.pi)
    g = ((x - S / 2) * math.cos(a) + (y - S / 2) * math.sin(a)) / S
    return (rng.uniform(0.92, 1.08) * (1.0 + strength * g)).astype(np.float32)[..., None]


def _rot(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(a), math.sin(a)
    dx, dy = x - cx, y - cy
    return c * dx + s * dy, -s * dx + c * dy


def _blob(rng: np.random.Generator, S: int, cx: float, cy: float, r: float, rough: float = 0.35) -> np.ndarray:
    """Irregular blob: an ellipse whose boundary is perturbed by smooth noise; float alpha in [0,1]."""
    x, y = _grid(S)
    u, v = _rot(x, y, cx, cy, rng.uniform(0, math.pi))
    e = rng.uniform(0.6, 1.0)
    d = np.sqrt((u / r) ** 2 + (v / (r * e)) ** 2)
    n = _value_noise(rng, S, cells=max(2, int(S / (r * 1.5))), octaves=2)
    d = d + rough * (n - 0.5) * 2
    return np.clip((1.0 - d) * r * 0.5 + 0.5, 0, 1).astype(np.float32)  # ~1 px soft edge


def _sdf_hexagon(px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Signed distance to a regular hexagon of inradius r (negative inside)."""
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    px, py = np.abs(px), np.abs(py)
    d = np.minimum(kx * px + ky * py, 0.0)
    px, py = px - 2 * d * kx, py - 2 * d * ky
    qx = px - np.clip(px, -kz * r, kz * r)
    qy = py - r
    return np.sqrt(qx ** 2 + qy ** 2) * np.sign(qy)


# ----------------------------------------------------------------------------- normal scenes

def render_weave(rng: np.random.Generator, S: int) -> Scene:
    """Woven fabric: over/under threads on a slightly rotated lattice, colour and phase jitter."""
    x, y = _grid(S)
    p = S / rng.uniform(14, 18)                         # thread period
    u, v = _rot(x, y, 0, 0, math.radians(rng.uniform(-4, 4)))
    u, v = u / p + rng.uniform(0, 2), v / p + rng.uniform(0, 2)
    i, j = np.floor(u), np.floor(v)
    fu, fv = u - i, v - j
    over = ((i + j) % 2) == 0
    prof = np.where(over, np.sin(math.pi * fv), np.sin(math.pi * fu)) ** 0.6
    fibre = _value_noise(rng, S, cells=S // 6, octaves=1)
    base = np.array([0.55, 0.42, 0.30]) + rng.uniform(-0.03, 0.03, 3)
    shade = 0.45 + 0.5 * prof + 0.08 * (fibre - 0.5)
    img = base[None, None, :] * shade[..., None] * _lighting(rng, S, 0.1)
    return Scene(img.astype(np.float32), None, None)


def render_marble(rng: np.random.Generator, S: int) -> Scene:
    """Marble: turbulent veins (sin of position + fractal noise) on a cream base."""
    x, y = _grid(S)
    a = rng.uniform(0, math.pi)
    turb = _value_noise(rng, S, cells=3, octaves=4)
    t = (x * math.cos(a) + y * math.sin(a)) / S * rng.uniform(3, 5) * 2 * math.pi
    vein = (1 - np.abs(np.sin(t + 7 * turb + rng.uniform(0, 6.3)))) ** 8
    cloud = _value_noise(rng, S, cells=4, octaves=3)
    light = np.array([0.88, 0.85, 0.80]) + rng.uniform(-0.04, 0.04, 3)
    dark = np.array([0.35, 0.38, 0.40]) + rng.uniform(-0.05, 0.05, 3)
    w = np.clip(0.75 * vein + 0.2 * (cloud - 0.5), 0, 1)[..., None]
    img = (light * (1 - w) + dark * w) * _lighting(rng, S, 0.08)
    return Scene(img.astype(np.float32), None, None)


def _plain_background(rng: np.random.Generator, S: int, level: float, rgb_jitter: float) -> np.ndarray:
    base = level + rng.uniform(-0.03, 0.03) + rng.uniform(-rgb_jitter, rgb_jitter, 3)
    tex = 0.03 * (_value_noise(rng, S, cells=4, octaves=2) - 0.5)
    return np.clip((base[None, None, :] + tex[..., None]) * _lighting(rng, S, 0.1), 0, 1).astype(np.float32)


def render_nut(rng: np.random.Generator, S: int) -> Scene:
    """Brass hex nut on a grey background; pose, colour and light jitter."""
    x, y = _grid(S)
    bg = _plain_background(rng, S, 0.30, 0.02)
    cx, cy = S / 2 + rng.uniform(-0.05, 0.05) * S, S / 2 + rng.uniform(-0.05, 0.05) * S
    u, v = _rot(x, y, cx, cy, rng.uniform(0, math.pi / 3))
    r_out, r_in = S * rng.uniform(0.27, 0.29), S * rng.uniform(0.12, 0.13)
    d_out = _sdf_hexagon(u, v, r_out)
    rad = np.sqrt(u ** 2 + v ** 2)
    d_in = r_in - rad                                   # >0 inside the hole
    sdf = np.maximum(d_out, d_in)
    alpha = np.clip(0.5 - sdf, 0, 1)[..., None]
    # Height field with bevels → pseudo-normal → directional shading (metal look).
    bevel = S * 0.04
    h = np.clip(-d_out / bevel, 0, 1) * np.clip(-d_in / bevel, 0, 1)
    gy, gx = np.gradient(h)
    la = rng.uniform(0, 2 * math.pi)
    shade = 0.78 + 0.3 * bevel * (gx * math.cos(la) + gy * math.sin(la)) + 0.04 * np.sin(rad / S * 150)
    col = np.array([0.78, 0.62, 0.25]) + rng.uniform(-0.05, 0.05, 3)
    obj = np.clip(col[None, None, :] * shade[..., None], 0, 1)
    img = bg * (1 - alpha) + obj * alpha
    return Scene(img.astype(np.float32), alpha[..., 0] > 0.5, bg)


def render_screw(rng: np.random.Generator, S: int) -> Scene:
    """Grayscale screw: threaded tapered shaft + round slotted head on a bright background."""
    x, y = _grid(S)
    bg = _plain_background(rng, S, 0.82, 0.0)
    bg = np.repeat(bg.mean(axis=2, keepdims=True), 3, axis=2)
    cx, cy = S / 2 + rng.uniform(-0.06, 0.06) * S, S / 2 + rng.uniform(-0.06, 0.06) * S
    a = rng.uniform(-0.3, 0.3) + (math.pi if rng.random() < 0.5 else 0.0)
    u, v = _rot(x, y, cx, cy, a)                        # u along the shaft
    L, r0 = S * rng.uniform(0.56, 0.60), S * 0.05
    t = u + L / 2                                       # 0 at the head end, L at the tip
    taper = np.clip((L - t) / (0.18 * L), 0, 1)
    radius = r0 * np.where(t < L, np.maximum(taper, 0.05), 0.0)
    shaft = np.where((t >= 0) & (t <= L), np.abs(v) - radius, 1e3)
    rh = S * 0.1
    hx = u + L / 2
    head = np.sqrt(hx ** 2 + v ** 2) - rh
    sdf = np.minimum(shaft, head)
    alpha = np.clip(0.5 - sdf, 0, 1)[..., None]
    pitch = S * 0.028
    thread = 0.5 + 0.5 * np.sin(2 * math.pi * (t / pitch + 0.3 * v / r0))
    cyl = 1 - np.clip(np.abs(v) / np.maximum(radius, 1e-3), 0, 1) ** 2
    metal = rng.uniform(0.35, 0.45)
    shaft_val = metal * (0.55 + 0.45 * cyl) * (0.75 + 0.25 * thread)
    dome = 1 - np.clip(np.sqrt(hx ** 2 + v ** 2) / rh, 0, 1) ** 2
    slot = (np.abs(v) < S * 0.012) & (np.abs(hx) < rh * 0.75)
    head_val = metal * (0.6 + 0.5 * dome) * np.where(slot, 0.35, 1.0)
    val = np.where(head < shaft, head_val, shaft_val)
    obj = np.repeat(np.clip(val, 0, 1)[..., None], 3, axis=2)
    img = bg * (1 - alpha) + obj * alpha
    return Scene(img.astype(np.float32), alpha[..., 0] > 0.5, bg)


# ----------------------------------------------------------------------------- defects
# Each returns (new image, bool mask) or None when the draw hit too little of the part.

def _pick_center(rng: np.random.Generator, S: int, fg: np.ndarray | None, margin: float) -> tuple[float, float]:
    if fg is not None and fg.any():
        ys, xs = np.nonzero(fg)
        k = rng.integers(len(xs))
        return float(xs[k]), float(ys[k])
    m = margin * S
    return float(rng.uniform(m, S - m)), float(rng.uniform(m, S - m))


def defect_scratch(rng, S, scene: Scene):
    """Thin curved line (quadratic Bézier), brighter or darker than the surface."""
    cx, cy = _pick_center(rng, S, scene.fg, 0.2)
    length = S * rng.uniform(0.14, 0.26)
    a = rng.uniform(0, math.pi)
    p0 = np.array([cx - math.cos(a) * length / 2, cy - math.sin(a) * length / 2])
    p2 = np.array([cx + math.cos(a) * length / 2, cy + math.sin(a) * length / 2])
    p1 = np.array([cx, cy]) + rng.uniform(-0.3, 0.3, 2) * length
    ts = np.linspace(0, 1, 40)[:, None]
    pts = (1 - ts) ** 2 * p0 + 2 * (1 - ts) * ts * p1 + ts ** 2 * p2
    m_img = Image.new("L", (S, S), 0)
    ImageDraw.Draw(m_img).line([tuple(p) for p in pts], fill=255, width=max(1, round(S / 90)), joint="curve")
    m = np.asarray(m_img) > 127
    if scene.fg is not None:
        m &= scene.fg
    bright, dark = rng.uniform(0.85, 0.97), rng.uniform(0.05, 0.2)
    target = bright if rng.random() < 0.6 else dark
    if m.any() and abs(target - float(scene.img[m].mean())) < 0.35:   # keep it visible on this surface
        target = dark if target == bright else bright
    img = scene.img.copy()
    img[m] = img[m] * 0.25 + target * 0.75
    return img, m


def defect_stain(rng, S, scene: Scene):
    """Blotchy colour shift (a tinted, slightly darkened irregular region)."""
    cx, cy = _pick_center(rng, S, scene.fg, 0.15)
    alpha = _blob(rng, S, cx, cy, S * rng.uniform(0.05, 0.09), rough=0.45)
    if scene.fg is not None:
        alpha = alpha * scene.fg
    tint = np.array([rng.uniform(0.55, 0.8), rng.uniform(0.45, 0.7), rng.uniform(0.3, 0.55)])
    if rng.random() < 0.5:
        tint = tint[::-1].copy()
    shifted = scene.img * tint[None, None, :] + 0.05 * (1 - tint)[None, None, :]
    img = scene.img * (1 - alpha[..., None]) + shifted * alpha[..., None]
    return img, alpha > 0.5


def defect_hole(rng, S, scene: Scene):
    """Dark blob with a slightly lighter frayed rim."""
    cx, cy = _pick_center(rng, S, scene.fg, 0.15)
    alpha = _blob(rng, S, cx, cy, S * rng.uniform(0.035, 0.06), rough=0.3)
    if scene.fg is not None:
        alpha = alpha * scene.fg
    depth = 0.06 + 0.06 * rng.random()
    img = scene.img * (1 - alpha[..., None]) + depth * alpha[..., None]
    return img, alpha > 0.5


def defect_missing(rng, S, scene: Scene):
    """A chunk of the part is gone: the object region inside a blob shows the background."""
    if scene.fg is None or scene.bg is None:
        raise ValueError("missing-part defects need an object scene")
    cx, cy = _pick_center(rng, S, scene.fg, 0.2)
    alpha = _blob(rng, S, cx, cy, S * rng.uniform(0.06, 0.09), rough=0.25) * scene.fg
    img = scene.img * (1 - alpha[..., None]) + scene.bg * alpha[..., None]
    return img, alpha > 0.5


def defect_cut(rng, S, scene: Scene):
    """Cut-paste: a patch from elsewhere, rescaled (×1.3–1.6), rotated 90° and re-lit, pasted."""
    ps = max(4, int(S * rng.uniform(0.12, 0.18)))
    k = rng.uniform(1.3, 1.6)
    src = math.ceil(ps * k)
    for _ in range(20):
        sx, sy = (int(v) for v in rng.integers(0, S - src, 2))
        dx, dy = (int(v) for v in rng.integers(0, S - ps, 2))
        if abs(sx - dx) + abs(sy - dy) > ps:
            break
    idx = np.minimum((np.arange(ps) * k).astype(int), src - 1)
    patch = scene.img[sy:sy + src, sx:sx + src][idx][:, idx]
    patch = np.rot90(patch, k=int(rng.choice([1, 3])))
    gain = rng.uniform(0.82, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.18)
    img = scene.img.copy()
    img[dy:dy + ps, dx:dx + ps] = np.clip(patch * gain, 0, 1)
    m = np.zeros((S, S), bool)
    m[dy:dy + ps, dx:dx + ps] = True
    return img, m


DEFECTS = {"scratch": defect_scratch, "stain": defect_stain, "hole": defect_hole,
           "missing": defect_missing, "cut": defect_cut}

# name → (kind, renderer, defect types, grayscale)
CLASS_SPECS = {
    "synth_weave": ("texture", render_weave, ("hole", "stain", "cut"), False),
    "synth_marble": ("texture", render_marble, ("scratch", "stain", "cut"), False),
    "synth_nut": ("object", render_nut, ("scratch", "stain", "missing"), False),
    "synth_screw": ("object", render_screw, ("scratch", "missing", "hole"), True),
}
CLASSES = tuple(CLASS_SPECS)
_SPLIT_CODE = {"train": 0, "test_good": 1, "test_defect": 2}


def _image_rng(seed: int, cls: str, split: str, index: int) -> np.random.Generator:
    """One independent stream per image, keyed by stable integers (not Python's hash)."""
    return np.random.default_rng([seed, CLASSES.index(cls), _SPLIT_CODE[split], index])


def _to_pil(img: np.ndarray, gray: bool, rng: np.random.Generator) -> Image.Image:
    img = img + rng.normal(0, 0.008, img.shape).astype(np.float32)   # sensor noise
    arr = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if gray:
        return Image.fromarray(arr.mean(axis=2).round().astype(np.uint8), mode="L")
    return Image.fromarray(arr, mode="RGB")


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray((mask.astype(np.uint8) * 255), mode="L").save(path)


def make_defect(rng: np.random.Generator, S: int, scene: Scene, defect: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw a defect whose visible area is between ~0.1 % and ~4 % of the image (retries)."""
    fn = DEFECTS[defect]
    min_area = max(3, int(0.0015 * S * S)) if defect != "scratch" else max(3, int(0.0006 * S * S))
    best = None
    for _ in range(30):
        img, m = fn(rng, S, scene)
        if m.sum() >= min_area:
            return img, m
        if best is None or m.sum() > best[1].sum():
            best = (img, m)
    if best is None or not best[1].any():
        raise RuntimeError(f"could not place a {defect} defect at image size {S}")
    return best


def generate_class(out: Path, cls: str, seed: int, image_size: int, n_train: int, n_test: int,
                   n_test_good: int | None = None) -> dict:
    kind, render, defects, gray = CLASS_SPECS[cls]
    S = image_size
    root = out / cls
    if n_test_good is None:
        n_test_good = max(1, round(n_test * 0.4))
    n_defect = max(len(defects), n_test - n_test_good)
    counts = {"train": n_train, "test_good": n_test_good}
    for sub in ("train/good", "test/good"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if kind == "object":
        (root.joinpath(*FG_MASK_SUBDIR)).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        rng = _image_rng(seed, cls, "train", i)
        scene = render(rng, S)
        _to_pil(scene.img, gray, rng).save(root / "train" / "good" / f"{i:03d}.png")
        if scene.fg is not None:
            _save_mask(scene.fg, root.joinpath(*FG_MASK_SUBDIR) / f"{i:03d}.png")
    for i in range(n_test_good):
        rng = _image_rng(seed, cls, "test_good", i)
        scene = render(rng, S)
        _to_pil(scene.img, gray, rng).save(root / "test" / "good" / f"{i:03d}.png")
    per_type = {d: 0 for d in defects}
    for i in range(n_defect):
        d = defects[i % len(defects)]
        rng = _image_rng(seed, cls, "test_defect", i)
        scene = render(rng, S)
        img, m = make_defect(rng, S, scene, d)
        (root / "test" / d).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / d).mkdir(parents=True, exist_ok=True)
        name = f"{per_type[d]:03d}"
        _to_pil(img, gray, rng).save(root / "test" / d / f"{name}.png")
        _save_mask(m, root / "ground_truth" / d / f"{name}_mask.png")
        per_type[d] += 1
    counts.update({f"test_{d}": n for d, n in per_type.items()})
    return counts


def generate(out, seed: int = 0, image_size: int = 256, n_train: int = 40, n_test: int = 20,
             classes=CLASSES, n_test_good: int | None = None) -> Path:
    """Write the synthetic dataset to ``out`` (see module docstring) and return its path.

    Re-running over an earlier synthetic output replaces the generated class folders;
    a folder that is not a synthetic dataset is never touched if it would be overwritten.
    """
    out = Path(out)
    classes = list(classes)
    unknown = [c for c in classes if c not in CLASS_SPECS]
    if unknown:
        raise ValueError(f"unknown synthetic classes {unknown}; available: {list(CLASSES)}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if n_train < 1 or n_test < 1:
        raise ValueError("n_train and n_test must be >= 1")
    info_path = out / "dataset_info.json"
    existing = [c for c in classes if (out / c).exists()]
    if existing:
        ours = False
        if info_path.is_file():
            try:
                ours = json.loads(info_path.read_text()).get("generator") == GENERATOR_NAME
            except (json.JSONDecodeError, AttributeError):
                ours = False
        if not ours:
            raise FileExistsError(f"{out} already holds {existing} and is not a synthetic dataset "
                                  f"(no {info_path} from '{GENERATOR_NAME}'); choose another --out")
        for c in existing:
            shutil.rmtree(out / c)
    out.mkdir(parents=True, exist_ok=True)
    counts = {c: generate_class(out, c, seed, image_size, n_train, n_test, n_test_good) for c in classes}
    info = {
        "textures": [c for c in classes if CLASS_SPECS[c][0] == "texture"],
        "objects": [c for c in classes if CLASS_SPECS[c][0] == "object"],
        "grayscale": [c for c in classes if CLASS_SPECS[c][3]],
        "generator": GENERATOR_NAME,
        "seed": seed,
        "image_size": image_size,
        "fg_mask_layout": "<cls>/" + "/".join(FG_MASK_SUBDIR) + "/<image file name>",
        "counts": counts,
    }
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (MVTec layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--n_train", type=int, default=40, help="normal training images per class")
    ap.add_argument("--n_test", type=int, default=20, help="test images per class (about 40%% normal)")
    ap.add_argument("--n_test_good", type=int, default=None, help="normal test images per class")
    ap.add_argument("--classes", default=",".join(CLASSES), help="comma-separated subset of " + ",".join(CLASSES))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = generate(args.out, args.seed, args.image_size, args.n_train, args.n_test,
                   [c for c in args.classes.split(",") if c], args.n_test_good)
    print(f"wrote synthetic dataset to {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
