"""The embedded demo corpus: coloured shapes whose captions state exactly what is drawn.

Each scene has one or two objects (shape, colour, position); the caption names each object's colour,
shape and position, and a pair of identical objects is counted ("two red circles, on the left and on the
right"). The images are real JPEGs at 256x256 (sizes a real min-side filter keeps), served by
`synergen.demo.localweb.LocalWeb` so that the demo exercises real downloads.

`classify_image` is the corpus's own judge for the demo's learning check: it names the dominant
colour (nearest palette colour by pixel count) and shape (fill ratio of that colour's bounding box).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 245)
# Object centres as fractions of the side; a pair uses the two positions of one axis.
POSITIONS = {"center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
PAIRS = (("left", "right"), ("top", "bottom"))


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    @property
    def dominant(self) -> SceneObject:
        """The object the learning check expects to see (all objects of a scene have the same size)."""
        return self.objects[0]


def sample_scene(rng: random.Random) -> Scene:
    """Half single objects (any of 5 positions), half pairs (left/right or top/bottom), a third of pairs identical."""
    if rng.random() < 0.5:
        return Scene((SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(POSITIONS))),))
    a, b = rng.choice(PAIRS)
    first = SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), a)
    if rng.random() < 1 / 3:
        second = SceneObject(first.shape, first.colour, b)
    else:
        second = SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), b)
    return Scene((first, second))


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"on the {position}" if position in ("left", "right") else f"at the {position}"


def caption(scene: Scene) -> str:
    """Exact caption: colours, shapes, counts and positions."""
    objs = scene.objects
    if len(objs) == 2 and (objs[0].shape, objs[0].colour) == (objs[1].shape, objs[1].colour):
        return f"two {objs[0].colour} {objs[0].shape}s, {_where(objs[0].position)} and {_where(objs[1].position)}"
    return " and ".join(f"a {o.colour} {o.shape} {_where(o.position)}" for o in objs)


def render(scene: Scene, size: int = 256) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    r = size * (0.2 if len(scene.objects) == 1 else 0.17)
    for o in scene.objects:
        cx, cy = (POSITIONS[o.position][0] * size, POSITIONS[o.position][1] * size)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            s = r * 0.9
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    return img


def write_demo_corpus(out_dir: str | Path, n: int = 3000, seed: int = 0, size: int = 256) -> list[dict]:
    """Render `n` scenes as JPEGs into `out_dir`; return one row per image (file, caption, attributes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scene = sample_scene(rng)
        name = f"shape_{i:06d}.jpg"
        path = out / name
        if not path.exists():
            render(scene, size).save(path, quality=92)
        d = scene.dominant
        rows.append({
            "file": name,
            "caption": caption(scene),
            "shape": d.shape,
            "colour": d.colour,
            "n_objects": len(scene.objects),
            "objects": [asdict(o) for o in scene.objects],
        })
    return rows


def write_url_list(rows: list[dict], base_url: str, path: str) -> str:
    """A LAION-style parquet URL list (url, caption, metadata columns) for files served under `base_url/files/`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "url": [f"{base_url.rstrip('/')}/files/{r['file']}" for r in rows],
        "caption": [r["caption"] for r in rows],
        "shape": [r["shape"] for r in rows],
        "colour": [r["colour"] for r in rows],
        "n_objects": [r["n_objects"] for r in rows],
    })
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def classify_image(image: Image.Image) -> tuple[str | None, str | None]:
    """(shape, colour) of the dominant object, or (None, None) when no palette colour covers 1% of the image."""
    x = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float32)  # [64, 64, 3]
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # [5, 3]
    dist = ((x[:, :, None, :] - palette[None, None]) ** 2).sum(-1)  # [64, 64, 5]
    label = dist.argmin(-1)
    counts = np.bincount(label.ravel(), minlength=len(palette))[1:]
    if counts.max() < 0.01 * label.size:
        return None, None
    ci = int(counts.argmax())
    colour = list(COLOURS)[ci]
    mask = label == ci + 1
    # Keep the largest connected blob along columns/rows roughly: use the bounding box of the mask's
    # densest half when two objects share a colour, by splitting at the widest empty gap.
    ys, xs = np.nonzero(mask)
    for axis in ("x", "y"):
        axis_vals = xs if axis == "x" else ys  # re-read: the x split may have dropped points
        u = np.unique(axis_vals)
        gaps = np.diff(u)
        if gaps.size and gaps.max() > 3:
            cut = u[gaps.argmax()]
            keep = axis_vals <= cut
            if keep.sum() < (~keep).sum():
                keep = ~keep
            ys, xs = ys[keep], xs[keep]
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / float(h * w)
    shape = "square" if fill > 0.88 else "circle" if fill > 0.66 else "triangle"
    return shape, colour
