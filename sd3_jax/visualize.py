"""PNG grids for samples: images with their prompts or generated captions underneath."""
import pathlib
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats (or uint8 already) -> uint8."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, texts: Optional[Sequence[str]] = None, *, columns: int = 8,
               scale: int = 2, text_lines: int = 4, chars_per_line: int = 24) -> Image.Image:
  """Tiles images (B, H, W, 3) into a grid, each cell upscaled with its text below it."""
  images = to_uint8(images)
  b, h, w, _ = images.shape
  columns = min(columns, b)
  rows = -(-b // columns)
  font = ImageFont.load_default()
  line_h = 11
  text_h = text_lines * line_h if texts is not None else 0
  cell_w, cell_h = max(w * scale, chars_per_line * 6), h * scale + text_h + 4
  grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i in range(b):
    x, y = (i % columns) * cell_w, (i // columns) * cell_h
    tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
    grid.paste(tile, (x + (cell_w - w * scale) // 2, y))
    if texts is not None:
      lines = textwrap.wrap(texts[i], chars_per_line)[:text_lines]
      for j, line in enumerate(lines):
        draw.text((x + 2, y + h * scale + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
  return grid


def save_grid(path, images: np.ndarray, texts: Optional[Sequence[str]] = None, **kw) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image_grid(images, texts, **kw).save(path)
  return path
