"""Synthetic people and cameras for the VI-ReID generator (numpy only).

An identity is an `Appearance`: body shape (height, shoulder width, head size,
hip line), hair (length, colour), upper and lower garments (two colours, a
material, a pattern and its period, sleeve or leg length), shoes, a bag (kind,
side, colour, material) and a chest emblem seen from the front only.

A camera renders it through its sensor:
  'visible'  the colours, under the camera's white balance and illumination
             (LLCM's cameras: low light, strong noise);
  'nir'      near-infrared (SYSU cam3/cam6, LLCM nir): no hue; each material
             reflects by its own non-linear function of the colour
             (`NIR_BASE`, `NIR_WEIGHTS`), not by luminance;
  'thermal'  far-infrared (RegDB): emission, not reflection: skin is warm,
             garments by their material's insulation, colour barely matters.
So shape, hair, bag, pattern layout and garment lengths carry across
modalities, colours only through the learnable material response.

Each image draws a pose (scale, shift, front/back view, mirror), a background
(the camera's wall and floor, texture, clutter boxes, sometimes an occluding
pole), an illumination gain, blur and sensor noise. A camera with `misalignment`
frames its people as a detector's boxes do (`_misaligned_pose`, `_occlude`): at a
random scale, cut at the head or the feet, off-centre, and behind occluders. Drawing is vectorised:
every part is a boolean mask over the pixel grid of the image.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

# Part labels of the label map; index into per-image colour tables.
BG, SKIN, HAIR, UPPER, UPPER2, LOWER, LOWER2, SHOES, BAG, EMBLEM = range(10)
NUM_PARTS = 10
NUM_MATERIALS = 5  # cotton, denim, synthetic, wool, leather
# Near-infrared reflectance per material: base + colour . weights, then a
# sigmoid; fixed physics shared by every seed (learnable across data sets).
NIR_BASE = np.array([0.55, 0.05, 0.35, 0.60, -0.10])
NIR_WEIGHTS = np.array(
  [
    [0.35, -0.60, 0.40],
    [0.10, 0.70, -0.50],
    [-0.55, 0.25, 0.55],
    [0.60, 0.10, -0.45],
    [0.20, 0.30, 0.15],
  ]
)
INSULATION = np.array([0.45, 0.70, 0.30, 0.85, 0.60])  # thermal: 1 = cold


@dataclasses.dataclass(frozen=True)
class Garment:
  colour: tuple  # RGB in [0, 1]
  colour2: tuple  # second colour of the pattern
  material: int
  pattern: int  # 0 plain, 1 horizontal stripes, 2 vertical, 3 checks, 4 dots
  period: float  # pattern period, in person heights
  # Upper: 0 short, 1 long sleeves. Lower: 0 trousers, 1 shorts, 2 skirt.
  length: int


@dataclasses.dataclass(frozen=True)
class Appearance:
  """What makes an identity recognisable; see module doc."""

  height: float  # fraction of the image height the person fills
  width: float  # shoulder half-width, in person heights
  head: float  # head radius, in person heights
  hip: float  # hip line, in person heights from the top
  hair_length: int  # 0 short, 1 chin, 2 shoulders
  hair_colour: tuple
  skin: tuple
  upper: Garment
  lower: Garment
  shoes: tuple
  bag: int  # 0 none, 1 backpack, 2 shoulder bag, 3 hand bag
  bag_side: int  # +1 right, -1 left (in the unmirrored pose)
  bag_colour: tuple
  bag_material: int
  emblem: int  # 0 none, 1 square, 2 disc


@dataclasses.dataclass(frozen=True)
class Camera:
  """A camera's sensor and scene, drawn once per (data set, camera)."""

  sensor: str  # 'visible' | 'nir' | 'thermal'
  wall: tuple  # RGB of the background above the horizon
  floor: tuple  # RGB below it
  horizon: float  # fraction of the image height
  white_balance: tuple  # per-channel gain (visible only)
  gain: float  # mean illumination gain
  noise: float  # sensor noise std, in [0, 1] intensity units
  blur: float  # 1 = sharp; 2 = rendered at half resolution and upsampled
  clutter: int  # max background boxes per image
  quality: int  # JPEG quality when saved as JPEG
  # Near-infrared only: 1 renders each material's own reflectance (the default,
  # a hard cross-modal gap); 0 renders the colour's luminance; in between mixes.
  infrared_gap: float = 1.0
  # True: the boxes of a person detector, loose and shifted (`_misaligned_pose`): each
  # image draws a scale, a vertical crop and a horizontal offset, and occluders.
  misalignment: bool = False


def _colour(rng: np.random.Generator) -> tuple:
  """A garment colour: a hue from 12 bins, saturation and value varied."""
  hue = (rng.integers(12) + rng.uniform(-0.2, 0.2)) / 12.0
  sat, val = rng.choice([0.0, 0.5, 0.85]), rng.uniform(0.25, 0.95)
  rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
  return tuple(float(c) for c in val * (1 - sat + sat * rgb))


def _garment(rng: np.random.Generator, lengths: int) -> Garment:
  return Garment(
    _colour(rng),
    _colour(rng),
    int(rng.integers(NUM_MATERIALS)),
    int(rng.choice(5, p=[0.4, 0.2, 0.15, 0.15, 0.1])),
    float(rng.uniform(0.03, 0.08)),
    int(rng.integers(lengths)),
  )


def sample_appearance(rng: np.random.Generator) -> Appearance:
  """A new identity."""
  return Appearance(
    height=float(rng.uniform(0.80, 0.94)),
    width=float(rng.uniform(0.085, 0.13)),
    head=float(rng.uniform(0.052, 0.068)),
    hip=float(rng.uniform(0.48, 0.56)),
    hair_length=int(rng.integers(3)),
    hair_colour=tuple(float(c) for c in rng.uniform(0.05, 0.6) * np.array([1.0, 0.8, 0.6])),
    skin=tuple(float(c) for c in rng.uniform(0.45, 0.9) * np.array([1.0, 0.78, 0.62])),
    upper=_garment(rng, 2),
    lower=_garment(rng, 3),
    shoes=_colour(rng),
    bag=int(rng.choice(4, p=[0.4, 0.25, 0.2, 0.15])),
    bag_side=int(rng.choice([-1, 1])),
    bag_colour=_colour(rng),
    bag_material=int(rng.integers(NUM_MATERIALS)),
    emblem=int(rng.choice(3, p=[0.5, 0.25, 0.25])),
  )


def look_alike(base: Appearance, rng: np.random.Generator) -> Appearance:
  """An identity sharing all of `base` but one or two colours (hard case)."""
  changes = {}
  for field in rng.choice(['upper', 'lower', 'shoes', 'bag'], size=2, replace=False)[
    : int(rng.integers(1, 3))
  ]:
    if field in ('upper', 'lower'):
      changes[field] = dataclasses.replace(getattr(base, field), colour=_colour(rng))
    elif field == 'shoes':
      changes['shoes'] = _colour(rng)
    else:
      changes['bag_colour'] = _colour(rng)
  return dataclasses.replace(base, **changes)


def sample_camera(rng: np.random.Generator, sensor: str, low_light: bool = False) -> Camera:
  """A camera: its scene colours, optics and noise."""
  dark = sensor != 'visible' or low_light
  return Camera(
    sensor=sensor,
    wall=_colour(rng),
    floor=_colour(rng),
    horizon=float(rng.uniform(0.45, 0.75)),
    white_balance=tuple(float(x) for x in rng.uniform(0.8, 1.2, size=3)),
    gain=float(rng.uniform(0.3, 0.6) if low_light else rng.uniform(0.8, 1.1)),
    noise=float(rng.uniform(0.05, 0.09) if dark else rng.uniform(0.015, 0.04)),
    blur=float(rng.uniform(1.6, 2.4) if sensor != 'visible' else rng.uniform(1.0, 1.4)),
    clutter=int(rng.integers(2, 7)),
    quality=int(rng.integers(80, 96)),
  )


def _nir(rgb: np.ndarray, material: np.ndarray) -> np.ndarray:
  """Near-infrared reflectance of colours [..., 3] of materials [...]."""
  z = NIR_BASE[material] + np.einsum('...c,...c->...', rgb, NIR_WEIGHTS[material])
  return 1.0 / (1.0 + np.exp(-4.0 * (z - 0.5)))


def _thermal(rgb: np.ndarray, material: np.ndarray) -> np.ndarray:
  """Far-infrared brightness: warm body through the material's insulation."""
  darkness = 1.0 - rgb.mean(-1)  # dark cloth absorbs a little more heat
  return 0.25 + 0.45 * (1.0 - INSULATION[material]) + 0.08 * darkness


def _tables(app: Appearance, cam: Camera) -> np.ndarray:
  """Per-part colour [NUM_PARTS, 3] (or intensity, repeated) for `cam`."""
  rgb = np.zeros((NUM_PARTS, 3))
  mat = np.zeros(NUM_PARTS, dtype=int)
  for part, colour, material in (
    (SKIN, app.skin, 0),
    (HAIR, app.hair_colour, 3),
    (UPPER, app.upper.colour, app.upper.material),
    (UPPER2, app.upper.colour2, app.upper.material),
    (LOWER, app.lower.colour, app.lower.material),
    (LOWER2, app.lower.colour2, app.lower.material),
    (SHOES, app.shoes, 4),
    (BAG, app.bag_colour, app.bag_material),
    (EMBLEM, app.upper.colour2, 2),
  ):
    rgb[part], mat[part] = colour, material
  if cam.sensor == 'visible':
    return rgb
  if cam.sensor == 'nir':
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    level = cam.infrared_gap * _nir(rgb, mat) + (1 - cam.infrared_gap) * luminance
  else:
    level = _thermal(rgb, mat)
  if cam.sensor == 'thermal':
    level[SKIN], level[HAIR] = 0.95, 0.6
  else:
    level[SKIN] = 0.8  # skin is bright in near-infrared whatever its colour
  return np.repeat(level[:, None], 3, axis=1)


def _pattern(kind: int, period: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Where a garment shows its second colour, for body coordinates u, v."""
  a, b = np.floor(u / period), np.floor(v / period)
  if kind == 1:
    return b % 2 == 1
  if kind == 2:
    return a % 2 == 1
  if kind == 3:
    return (a + b) % 2 == 1
  if kind == 4:
    fu, fv = u / period - a - 0.5, v / period - b - 0.5
    return fu * fu + fv * fv < 0.09
  return np.zeros_like(u, dtype=bool)


def _label_map(
  app: Appearance, u: np.ndarray, v: np.ndarray, front: bool, swing: float
) -> np.ndarray:
  """Part labels [H, W] for body coordinates u (across), v (down), both in
  person heights, u = 0 on the body axis and v = 0 at the top of the head."""
  w, hip, au = app.width, app.hip, np.abs(u)
  labels = np.full(u.shape, BG, dtype=np.int8)

  def paint(mask, part):
    labels[mask] = part

  hair_end = 0.085 + 0.055 * app.hair_length
  long_hair = (au < app.head * 1.05) & (v > 0.03) & (v < hair_end)
  if front:
    paint(long_hair, HAIR)  # behind the head and shoulders
  # Legs: two columns with a gap, from the hip to the shoes.
  gap = (au < 0.012) & (v > hip + 0.06)
  legs = (v > hip) & (v < 0.955) & (au < 0.8 * w) & ~gap
  paint(legs, SKIN)
  lower_end = {0: 0.955, 1: hip + 0.17, 2: hip + 0.24}[app.lower.length]
  lower = legs & (v < lower_end)
  if app.lower.length == 2:  # skirt: a trapezoid over both legs
    lower = (v > hip - 0.02) & (v < lower_end) & (au < w * (0.8 + 1.2 * (v - hip)))
  lower |= (v > hip - 0.03) & (v <= hip) & (au < 0.85 * w)
  stripes = _pattern(app.lower.pattern, app.lower.period, u, v)
  paint(lower & ~stripes, LOWER)
  paint(lower & stripes, LOWER2)
  paint((v >= 0.955) & (v < 1.0) & (au < 0.8 * w) & ~(au < 0.012), SHOES)
  # Torso, tapered to the waist; arms hang beside it and swing.
  taper = 1.0 - 0.25 * (v - 0.165) / (hip - 0.165)
  torso = (v > 0.165) & (v <= hip) & (au < w * taper)
  arm_end = 0.52 + swing
  arms = (au >= w) & (au < w + 0.042) & (v > 0.18) & (v < arm_end)
  sleeve_end = 0.29 if app.upper.length == 0 else arm_end - 0.045
  upper = torso | (arms & (v < sleeve_end))
  stripes = _pattern(app.upper.pattern, app.upper.period, u, v)
  paint(upper & ~stripes, UPPER)
  paint(upper & stripes, UPPER2)
  paint(arms & (v >= sleeve_end), SKIN)
  paint((au < 0.024) & (v > 0.13) & (v <= 0.17), SKIN)  # neck
  if front and app.emblem:
    du, dv = u / 0.035, (v - 0.27) / 0.035
    paint(
      (du * du + dv * dv < 1) if app.emblem == 2 else (np.abs(du) < 1) & (np.abs(dv) < 1), EMBLEM
    )
  # Head: skin face in front, hair from behind; then the hair line.
  head = (u / (0.8 * app.head)) ** 2 + ((v - 0.085) / app.head) ** 2 < 1
  paint(head, SKIN if front else HAIR)
  paint(head & (v < 0.085 - 0.45 * app.head), HAIR)
  if not front:
    paint(long_hair, HAIR)  # over the shoulders, seen from behind
  side = u * app.bag_side  # > 0 on the bag's side
  if app.bag == 1 and not front:
    paint((au < 0.85 * w) & (v > 0.19) & (v < 0.43), BAG)
  elif app.bag == 1:  # straps seen from the front
    paint((np.abs(au - 0.6 * w) < 0.011) & (v > 0.17) & (v < 0.36), BAG)
  elif app.bag == 2:
    paint((side > w - 0.01) & (side < w + 0.085) & (v > hip - 0.06) & (v < hip + 0.07), BAG)
    paint(
      (np.abs(side + w - 2 * w * (v - 0.17) / (hip - 0.17)) < 0.009)
      & (v > 0.17)
      & (v < hip - 0.06),
      BAG,
    )
  elif app.bag == 3:
    paint((side > w) & (side < w + 0.07) & (v > arm_end - 0.02) & (v < arm_end + 0.08), BAG)
  return labels


def _smooth_noise(rng: np.random.Generator, shape: tuple, cells: tuple) -> np.ndarray:
  """Low-frequency noise in [-1, 1] of `shape` [H, W] (bilinear upsampling)."""
  grid = rng.uniform(-1, 1, size=cells).astype(np.float32)
  return np.asarray(Image.fromarray(grid).resize((shape[1], shape[0]), Image.BILINEAR))


def _background(cam: Camera, rng: np.random.Generator, shape: tuple, tone) -> np.ndarray:
  """The camera's scene [H, W, 3]: wall, floor, texture and clutter boxes."""
  h, w = shape
  yy = np.arange(h)[:, None, None]
  horizon = (cam.horizon + rng.uniform(-0.05, 0.05)) * h
  image = np.where(yy < horizon, tone(cam.wall), tone(cam.floor))
  image = image * (1 + 0.15 * _smooth_noise(rng, shape, (6, 4))[..., None])
  image = np.broadcast_to(image, (h, w, 3)).copy()
  for _ in range(int(rng.integers(cam.clutter + 1))):
    y0, x0 = rng.integers(h), rng.integers(w)
    y1 = y0 + rng.integers(h // 10, h // 3)
    x1 = x0 + rng.integers(w // 8, w // 2)
    image[y0:y1, x0:x1] = tone(_colour(rng))
  return image


def _misaligned_pose(
  app: Appearance, pose: np.random.Generator, h: int, w: int
) -> tuple[float, float, float]:
  """(person height, body axis column, head row) in pixels, as a detector's box
  frames a person: too loose or too tight (the person fills 55-110% of the image
  height), cut at the head or the feet (the head row moves by -20% to +25% of the
  person), and off-centre (the axis anywhere in the middle 60% of the width)."""
  ph = app.height * pose.uniform(0.6, 1.2) * h
  cx = w * pose.uniform(0.2, 0.8)
  top = (h - ph) * pose.uniform(0.0, 1.0) + ph * pose.uniform(-0.2, 0.25)
  return ph, cx, top


def _occlude(image: np.ndarray, rng: np.random.Generator, tone) -> None:
  """Up to two occluders in front of the person [H, W, 3] (in place): a box rising
  from the bottom edge (a bin, a car, a passer-by's legs) or entering from a side."""
  rh, rw = image.shape[:2]
  for _ in range(int(rng.choice(3, p=[0.35, 0.45, 0.2]))):
    colour = tone(_colour(rng))
    if rng.random() < 0.5:  # from the bottom
      height = int(rh * rng.uniform(0.15, 0.45))
      x0 = int(rng.integers(rw))
      image[rh - height :, x0 : x0 + int(rw * rng.uniform(0.3, 0.8))] = colour
    else:  # from a side
      width = int(rw * rng.uniform(0.15, 0.4))
      y0 = int(rng.integers(rh))
      rows = slice(y0, y0 + int(rh * rng.uniform(0.2, 0.6)))
      columns = slice(0, width) if rng.random() < 0.5 else slice(rw - width, rw)
      image[rows, columns] = colour


def render(
  app: Appearance,
  cam: Camera,
  rng: np.random.Generator,
  size: tuple,
  pose: np.random.Generator | None = None,
  front: bool | None = None,
) -> np.ndarray:
  """One image [H, W, 3] uint8 of `app` seen by `cam`, `size` = (H, W).

  `pose` draws the pose (default: `rng`); RegDB's paired cameras share it.
  `front` fixes the view (default: drawn).
  """
  pose = rng if pose is None else pose
  h, w = size
  if cam.misalignment:
    ph, cx, top = _misaligned_pose(app, pose, h, w)
  else:
    scale = app.height * pose.uniform(0.92, 1.05)
    ph = scale * h
    cx = w / 2 + pose.normal(0, 0.05 * w)
    top = (h - ph) * pose.uniform(0.15, 0.85)
  drawn_front, mirror = pose.random() < 0.5, pose.random() < 0.5
  front = drawn_front if front is None else front
  swing = pose.uniform(-0.03, 0.03)
  # Rendered at 1/blur of the size and upsampled: infrared optics are softer.
  rh, rw = max(8, round(h / cam.blur)), max(4, round(w / cam.blur))
  yy, xx = np.mgrid[0:rh, 0:rw].astype(np.float32)
  u = ((xx + 0.5) * w / rw - cx) / ph
  v = ((yy + 0.5) * h / rh - top) / ph
  labels = _label_map(app, -u if mirror else u, v, front, swing)

  table = _tables(app, cam)
  if cam.sensor == 'visible':

    def tone(c):
      return np.asarray(c, dtype=np.float32)
  else:
    bg_material = int(rng.integers(NUM_MATERIALS))

    def tone(c):
      c = np.asarray(c, dtype=np.float32)
      level = (
        _nir(c, np.array(bg_material)) * 0.7
        if cam.sensor == 'nir'
        else 0.1 + 0.25 * float(c.mean())
      )
      return np.full(3, level, dtype=np.float32)

  image = _background(cam, rng, (rh, rw), tone)
  person = labels != BG
  shade = 1.0 - 0.35 * np.clip((u / (app.width + 0.05)) ** 2, 0, 1) - 0.1 * v
  image[person] = table[labels[person]] * shade[person][:, None]
  if rng.random() < 0.12:  # an occluding pole in front of the person
    x0 = rng.integers(rw)
    image[:, x0 : x0 + max(1, rw // 12)] = tone(_colour(rng))

  if cam.misalignment:
    _occlude(image, rng, tone)
  gain = cam.gain * rng.uniform(0.85, 1.15)
  if cam.sensor == 'visible':
    image = image * np.asarray(cam.white_balance, dtype=np.float32)
    grey = image.mean(-1, keepdims=True)
    image = grey + (image - grey) * (0.6 if cam.gain < 0.7 else 1.0)
  image = image * gain + 0.05 * _smooth_noise(rng, (rh, rw), (3, 2))[..., None]
  image = np.clip(image, 0, 1) ** rng.uniform(0.85, 1.15)
  image = Image.fromarray((image * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
  image = np.asarray(image, dtype=np.float32) / 255
  channels = 3 if cam.sensor == 'visible' else 1
  noise = rng.normal(0, cam.noise, size=(h, w, channels)).astype(np.float32)
  image = np.clip(image + noise, 0, 1)
  return np.round(image * 255).astype(np.uint8)
