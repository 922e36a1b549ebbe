"""Small PNG renderings for reports (image grids, confusion matrices) with Pillow only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def save_image_grid(images_nhwc: np.ndarray, path: Path, columns: int = 8, min_cell: int = 64) -> None:
    """Tile uint8 NHWC images into one PNG, upscaled (nearest) so tiny images stay visible."""
    count, height, width, channels = images_nhwc.shape
    scale = max(1, min_cell // max(height, width))
    rows = -(-count // columns)
    gap = 2
    cell_h, cell_w = height * scale, width * scale
    canvas = np.full((rows * (cell_h + gap) + gap, columns * (cell_w + gap) + gap, 3), 255, dtype=np.uint8)
    for index, image in enumerate(images_nhwc):
        rgb = np.repeat(image, 3, axis=2) if channels == 1 else image[:, :, :3]
        big = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
        row, col = divmod(index, columns)
        top, left = gap + row * (cell_h + gap), gap + col * (cell_w + gap)
        canvas[top : top + cell_h, left : left + cell_w] = big
    Image.fromarray(canvas).save(path)


def save_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    """A row-normalised heat map with counts: true classes down the side, predicted classes across the top."""
    classes = len(class_names)
    cell = 44 if classes <= 20 else 20
    left = max(48, 12 + 7 * min(14, max(len(name) for name in class_names)))
    top = 44
    image = Image.new("RGB", (left + classes * cell + 10, top + classes * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    shares = matrix / matrix.sum(axis=1, keepdims=True).clip(min=1)
    draw.text((left, 4), "predicted class ->   (rows: true class)", fill="black")
    for predicted in range(classes):
        draw.text((left + predicted * cell + 2, top - 16), class_names[predicted][:5], fill="black")
    for true in range(classes):
        row_top = top + true * cell
        draw.text((4, row_top + cell // 3), class_names[true][:14], fill="black")
        for predicted in range(classes):
            cell_left = left + predicted * cell
            shade = int(255 - 200 * shares[true, predicted])
            colour = (shade, shade, 255) if true == predicted else (255, shade, shade)
            draw.rectangle([cell_left, row_top, cell_left + cell - 2, row_top + cell - 2], fill=colour)
            if cell >= 40:
                draw.text((cell_left + 4, row_top + cell // 3), str(int(matrix[true, predicted])), fill="black")
    image.save(path)
