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
    """A row-normalised heat map with counts, true classes down, predicted across."""
    classes = len(class_names)
    cell = 44 if classes <= 20 else 20
    label_width = 8 + 7 * max(len(name) for name in class_names)
    size = (label_width + classes * cell + 10, label_width + classes * cell + 30)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    row_totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    shares = matrix / row_totals
    draw.text((label_width, 4), "predicted ->   (rows: true class)", fill="black")
    for true in range(classes):
        top = label_width + true * cell
        draw.text((4, top + cell // 3), class_names[true][:14], fill="black")
        for predicted in range(classes):
            left = label_width + predicted * cell
            shade = int(255 - 200 * shares[true, predicted])
            colour = (shade, shade, 255) if true == predicted else (255, shade, shade)
            draw.rectangle([left, top, left + cell - 2, top + cell - 2], fill=colour)
            if cell >= 40:
                draw.text((left + 4, top + cell // 3), str(int(matrix[true, predicted])), fill="black")
    for predicted in range(classes):
        draw.text((label_width + predicted * cell + 2, label_width - 14), class_names[predicted][:5], fill="black")
    image.save(path)
