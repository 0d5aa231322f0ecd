"""Numpy renderer for spatial scenes: fixed perspective camera, flat shading, painter's order.

Objects are drawn far to near (painter's algorithm, per object), each one from a few
back-face-culled convex faces (or an analytic disc for a sphere), so nearer objects really
hide farther ones. Polygons are rasterised with edge functions over the pixel grid of their
bounding box, vectorised in numpy. Every pixel of an object has the object's exact palette
hue (pure, saturated) scaled by a per-face shade, and the background and ground are
unsaturated, which is what makes colour segmentation in `verifier.py` exact on gold
renders.

World frame: x to the right, y up, z away from the camera; the ground plane is y = 0. The
camera has no yaw, so "left/right" in the world is left/right in the image.
"""
import dataclasses
import functools
from typing import NamedTuple, Sequence

import numpy as np

# Saturated palette (RGB in [0, 1]); hues at least 30 degrees apart so that shading (which
# only scales brightness) never moves a pixel to another colour's hue.
PALETTE = {
    "red": (1.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 0.85, 0.0),
    "cyan": (0.0, 0.9, 0.9),
    "blue": (0.1, 0.2, 1.0),
    "purple": (0.6, 0.0, 1.0),
}
# Hue (degrees) of each palette colour, used by the verifier's segmentation.
PALETTE_HUE = {
    name: float(np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360)
    for name, (r, g, b) in PALETTE.items()
}
SKY = (205, 205, 210)
GROUNDS = {"floor": (128, 128, 124), "table": (150, 132, 112)}  # low saturation (< 0.3)

LIGHT = np.array([-0.45, 0.8, -0.4]) / np.linalg.norm([-0.45, 0.8, -0.4])
_AMBIENT, _DIFFUSE = 0.42, 0.58
_CYL_SIDES = 10

# Camera pose and field of view; the image size only scales the intrinsics.
CAM_POS = np.array([0.0, 5.0, -4.5])
CAM_TARGET = np.array([0.0, 0.0, 1.6])
CAM_FOV_DEG = 42.0


@dataclasses.dataclass(frozen=True)
class Camera:
  """Pinhole camera looking down at the ground plane; pixel (col, row), origin top-left."""
  size: int
  pos: np.ndarray
  right: np.ndarray
  up: np.ndarray
  fwd: np.ndarray
  focal: float

  def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points [..., 3] -> (pixel coords [..., 2] as (col, row), camera depth [...])."""
    d = pts - self.pos
    xc, yc, zc = d @ self.right, d @ self.up, d @ self.fwd
    half = self.size / 2
    uv = np.stack([half + self.focal * xc / zc, half - self.focal * yc / zc], axis=-1)
    return uv, zc

  def unproject_to_plane(self, u: np.ndarray, v: np.ndarray,
                         height: float = 0.0) -> np.ndarray:
    """Pixel coords (col, row) -> world points [..., 3] on the plane y = height."""
    half = self.size / 2
    u, v = np.asarray(u, float), np.asarray(v, float)
    dirs = (self.fwd + ((u - half) / self.focal)[..., None] * self.right
            - ((v - half) / self.focal)[..., None] * self.up)
    t = (height - self.pos[1]) / dirs[..., 1]
    return self.pos + t[..., None] * dirs


@functools.lru_cache(maxsize=16)
def camera(size: int) -> Camera:
  """The fixed scene camera for a square image of `size` pixels."""
  fwd = CAM_TARGET - CAM_POS
  fwd = fwd / np.linalg.norm(fwd)
  right = np.array([1.0, 0.0, 0.0])
  up = np.cross(fwd, right)
  focal = (size / 2) / np.tan(np.radians(CAM_FOV_DEG) / 2)
  return Camera(size, CAM_POS, right, up, fwd, focal)


class Part(NamedTuple):
  """A convex piece of an object: vertices, faces (vertex index lists) and face normals."""
  verts: np.ndarray          # [V, 3]
  faces: list                # F index arrays
  normals: np.ndarray        # [F, 3]


_UP = np.array([0.0, 1.0, 0.0])


def _box(cx, cz, y0, hx, hz, h, yaw) -> Part:
  """A yawed box with base at height y0."""
  c, s = np.cos(yaw), np.sin(yaw)
  ex, ez = np.array([c, 0.0, s]), np.array([-s, 0.0, c])
  sx = np.array([-1, 1, 1, -1] * 2)[:, None]
  sz = np.array([-1, -1, 1, 1] * 2)[:, None]
  sy = np.array([0.0] * 4 + [h] * 4)[:, None]
  v = np.array([cx, y0, cz]) + sx * hx * ex + sz * hz * ez + sy * _UP
  faces = [(4, 5, 6, 7), (0, 3, 2, 1), (0, 1, 5, 4), (2, 3, 7, 6), (1, 2, 6, 5), (3, 0, 4, 7)]
  return Part(v, faces, np.stack([_UP, -_UP, -ez, ez, ex, -ex]))


def _ring(cx, cz, y, r, n, phase=0.0):
  a = phase + 2 * np.pi * np.arange(n) / n
  return np.stack([cx + r * np.cos(a), np.full(n, y), cz + r * np.sin(a)], axis=-1)


def _prism(cx, cz, y0, r, h, n, phase=0.0) -> Part:
  v = np.concatenate([_ring(cx, cz, y0, r, n, phase), _ring(cx, cz, y0 + h, r, n, phase)])
  i = np.arange(n)
  j = (i + 1) % n
  faces = [tuple(range(2 * n - 1, n - 1, -1)), tuple(range(n))]
  faces += list(zip(i, j, n + j, n + i))
  a = phase + 2 * np.pi * (i + 0.5) / n
  sides = np.stack([np.cos(a), np.zeros(n), np.sin(a)], -1)
  return Part(v, faces, np.concatenate([[_UP, -_UP], sides]))


def _pyramid(cx, cz, y0, r, h, n, phase=0.0) -> Part:
  v = np.concatenate([_ring(cx, cz, y0, r, n, phase), [[cx, y0 + h, cz]]])
  i = np.arange(n)
  j = (i + 1) % n
  faces = [tuple(range(n))] + list(zip(i, j, np.full(n, n)))
  nrm = np.cross(v[n] - v[i], v[j] - v[i])
  nrm = nrm / np.linalg.norm(nrm, axis=-1, keepdims=True)
  nrm = nrm * np.sign(nrm[:, 1:2])
  return Part(v, faces, np.concatenate([[-_UP], nrm]))


# Facing direction -> unit vector (x, z) the chair's seat front points to.
FACING = {"facing left": (-1.0, 0.0), "facing right": (1.0, 0.0),
          "facing front": (0.0, -1.0), "facing back": (0.0, 1.0)}


def object_parts(obj) -> list[Part]:
  """Convex parts of one object; spheres are handled separately.

  `obj` needs: shape, x, z, y0, half (footprint half-extent), height, yaw, pose.
  """
  x, z, y0, r, h = obj.x, obj.z, obj.y0, obj.half, obj.height
  if obj.shape == "cube":
    return [_box(x, z, y0, r, r, h, obj.yaw)]
  if obj.shape == "cylinder":
    return [_prism(x, z, y0, r, h, _CYL_SIDES, obj.yaw)]
  if obj.shape == "cone":
    return [_pyramid(x, z, y0, r, h, _CYL_SIDES, obj.yaw)]
  if obj.shape == "pyramid":
    return [_pyramid(x, z, y0, r * np.sqrt(2), h, 4, obj.yaw + np.pi / 4)]
  if obj.shape == "chair":
    fx, fz = FACING[obj.pose]
    seat = _box(x, z, y0, r, r, 0.45 * h, 0.0)
    # Backrest: a thin slab along the back edge, full height.
    bx, bz = x - fx * 0.8 * r, z - fz * 0.8 * r
    hx, hz = (0.2 * r, r) if fx else (r, 0.2 * r)
    back = _box(bx, bz, y0, hx, hz, h, 0.0)
    return [seat, back]
  raise ValueError(f"unknown shape {obj.shape!r}")


_NEXT = {k: np.r_[1:k, 0] for k in range(3, 2 * _CYL_SIDES + 1)}


def _convex_mask(uv: np.ndarray, size: int):
  """Rasterise a convex polygon (pixel coords [k, 2]) -> (row slice, col slice, mask)."""
  lo, hi = uv.min(0), uv.max(0)
  c0, r0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
  c1, r1 = min(int(np.ceil(hi[0])), size), min(int(np.ceil(hi[1])), size)
  if c1 <= c0 or r1 <= r0:
    return None
  px = (np.arange(c0, c1) + 0.5)[None, None, :]
  py = (np.arange(r0, r1) + 0.5)[None, :, None]
  nxt = uv[_NEXT[len(uv)]]
  area = np.sum(uv[:, 0] * nxt[:, 1] - nxt[:, 0] * uv[:, 1])
  a = uv[:, :, None, None]
  d = nxt[:, :, None, None] - a
  cross = (px - a[:, 0]) * d[:, 1] - (py - a[:, 1]) * d[:, 0]
  inside = np.all(cross <= 0 if area >= 0 else cross >= 0, axis=0)
  return slice(r0, r1), slice(c0, c1), inside


@dataclasses.dataclass
class Rendered:
  """A render: the image, which object owns each pixel, and per-object pixel counts."""
  image: np.ndarray          # uint8 [H, W, 3]
  ids: np.ndarray            # int16 [H, W]; -1 = background/ground, else object index
  full_area: np.ndarray      # int [n]; pixels the object would cover if alone
  full_bottom: np.ndarray    # int [n]; lowest row (exclusive) of the unoccluded silhouette

  def visible_mask(self, i: int) -> np.ndarray:
    return self.ids == i

  @property
  def visible_area(self) -> np.ndarray:
    return np.bincount(self.ids[self.ids >= 0].ravel(), minlength=len(self.full_area))

  @property
  def visible_fraction(self) -> np.ndarray:
    return self.visible_area / np.maximum(self.full_area, 1)

  def box(self, i: int):
    """VSD box [y_min, y_max, x_min, x_max] of the visible pixels, or None if hidden."""
    rows, cols = np.nonzero(self.ids == i)
    if rows.size == 0:
      return None
    return [int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())]


def draw_order(objects: Sequence) -> list[int]:
  """Painter's order: far to near by camera distance; a stacked object right after its support."""
  cam = CAM_POS
  ground = [i for i, o in enumerate(objects) if o.support < 0]
  ground.sort(key=lambda i: -np.hypot(objects[i].x - cam[0], objects[i].z - cam[2]))
  order = []
  for i in ground:
    order.append(i)
    order.extend(j for j, o in enumerate(objects) if o.support == i)
  return order


def render(objects: Sequence, ground: str = "floor", size: int = 64) -> Rendered:
  """Render objects (see `object_parts` for the fields) -> `Rendered`."""
  cam = camera(size)
  img = np.empty((size, size, 3), np.uint8)
  img[:] = SKY
  # Ground plane: rows whose ray hits y = 0 in front of the camera; horizon is a row.
  rows = np.arange(size) + 0.5
  ray_y = cam.fwd[1] - ((rows - size / 2) / cam.focal) * cam.up[1]
  img[ray_y < 0] = GROUNDS[ground]
  ids = np.full((size, size), -1, np.int16)
  n = len(objects)
  full_area = np.zeros(n, np.int64)
  full_bottom = np.zeros(n, np.int64)
  for i in draw_order(objects):
    obj = objects[i]
    colour = np.asarray(PALETTE[obj.colour])
    own = np.zeros((size, size), bool)
    if obj.shape == "sphere":
      _draw_sphere(cam, obj, colour, img, own)
    else:
      parts = object_parts(obj)
      parts.sort(key=lambda p: -np.linalg.norm(p.verts.mean(0) - cam.pos))
      for part in parts:
        first = part.verts[[f[0] for f in part.faces]]
        front = np.einsum("fk,fk->f", part.normals, first - cam.pos) < 0  # back-face cull
        uv_all, _ = cam.project(part.verts)
        shades = _AMBIENT + _DIFFUSE * np.clip(part.normals @ LIGHT, 0, None)
        for f in np.nonzero(front)[0]:
          hit = _convex_mask(uv_all[list(part.faces[f])], size)
          if hit is None:
            continue
          rs, cs, m = hit
          img[rs, cs][m] = np.round(255 * shades[f] * colour)
          own[rs, cs] |= m
    ids[own] = i
    full_area[i] = own.sum()
    r = np.nonzero(own.any(1))[0]
    full_bottom[i] = r.max() + 1 if r.size else 0
  return Rendered(img, ids, full_area, full_bottom)


def _draw_sphere(cam: Camera, obj, colour, img, own):
  centre = np.array([obj.x, obj.y0 + obj.half, obj.z])
  (cu, cv), depth = cam.project(centre)
  rad = cam.focal * obj.half / depth
  size = cam.size
  c0, c1 = max(int(cu - rad), 0), min(int(np.ceil(cu + rad)), size)
  r0, r1 = max(int(cv - rad), 0), min(int(np.ceil(cv + rad)), size)
  if c1 <= c0 or r1 <= r0:
    return
  dx = (np.arange(c0, c1) + 0.5 - cu) / rad
  dy = ((np.arange(r0, r1) + 0.5 - cv) / rad)[:, None]
  d2 = dx ** 2 + dy ** 2
  m = d2 <= 1.0
  # Normal in camera axes -> world; shade quantised to 4 levels for a flat-shaded look.
  nz = -np.sqrt(np.clip(1 - d2, 0, 1))
  normal = (dx[None, :, None] * cam.right - dy[..., None] * cam.up + nz[..., None] * cam.fwd)
  lam = np.clip(normal @ LIGHT, 0, 1)
  shade = _AMBIENT + _DIFFUSE * np.round(lam * 3) / 3
  patch = img[r0:r1, c0:c1]
  patch[m] = np.round(255 * shade[m][:, None] * colour)
  own[r0:r1, c0:c1] |= m
