"""Two classes of 224×224 RGB crops from scikit-learn's two bundled photos (§5.2's stand-in).

scikit-learn ships two 427×640 photos (``load_sample_images``): a temple among trees by a lake
("china", class 0) and a dahlia on a dark green background ("flower", class 1). Each class is
made of square crops of its photo:

- side s drawn uniformly from [:data:`MIN_SIDE`, :data:`MAX_SIDE`] pixels, top-left corner
  uniformly inside the source region, mirrored left–right with probability ½, upsampled to
  224×224 (Pillow's bicubic filter, applied to the crop alone) and rounded to 8-bit RGB, as a
  stored photo is;
- **training** crops lie wholly in columns [0, :data:`TRAIN_COLUMNS`) of the photo, **test**
  crops wholly in columns [:data:`TEST_FROM`, 640): the two regions share no pixel, and a
  32-column gap keeps their borders apart, so no test image is a near-duplicate of a training
  image; training crops overlap each other, as photos of one scene do;
- training and test crops come from separate random streams of ``seed``, so the training set
  does not depend on how many test crops are asked for.

Nothing is downloaded: the photos are files inside scikit-learn's wheel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torch import Tensor

SIDE = 224
MIN_SIDE = 112
MAX_SIDE = 192
TRAIN_COLUMNS = 416
TEST_FROM = 448
CLASS_NAMES = ("china (temple, trees, lake)", "flower (dahlia)")


@dataclass
class PhotoCrops:
    """8-bit crops and their labels.

    Attributes:
        train_images: ``(n, 224, 224, 3)`` uint8.
        train_labels: ``(n,)`` int64, 0 = china, 1 = flower.
        test_images: ``(m, 224, 224, 3)`` uint8.
        test_labels: ``(m,)`` int64.
        name: one line describing the data.
    """

    train_images: np.ndarray
    train_labels: Tensor
    test_images: np.ndarray
    test_labels: Tensor
    name: str


def as_tensor(images: np.ndarray) -> Tensor:
    """uint8 ``(b, H, W, 3)`` → float32 ``(b, 3, H, W)`` in [0, 1], channels-last in memory
    (what the depthwise convolutions of EfficientNet run fastest on, on the CPU)."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0
    return x.contiguous(memory_format=torch.channels_last)


def _crops(photo: np.ndarray, columns: tuple[int, int], count: int,
           rng: np.random.Generator) -> np.ndarray:
    """``count`` random square crops lying in ``photo[:, columns[0]:columns[1]]`` (module doc)."""
    height = photo.shape[0]
    source = Image.fromarray(photo)
    out = np.empty((count, SIDE, SIDE, 3), dtype=np.uint8)
    widest = min(MAX_SIDE, columns[1] - columns[0], height)
    if widest < MIN_SIDE:
        raise ValueError(f"a region of columns {columns} cannot hold a {MIN_SIDE}-pixel crop")
    for i in range(count):
        side = int(rng.integers(MIN_SIDE, widest + 1))
        left = int(rng.integers(columns[0], columns[1] - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = source.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop.resize((SIDE, SIDE), Image.Resampling.BICUBIC))
    return out


def photo_crops(train_per_class: int, test_per_class: int, seed: int = 0) -> PhotoCrops:
    """The two-class crop data set of the module doc, reproducible from ``seed``.

    Returns training images ordered class 0 then class 1 (``train_per_class`` each), the same for
    the test images.
    """
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"need at least one crop per class, got train_per_class="
                         f"{train_per_class}, test_per_class={test_per_class}")
    photos = load_sample_images().images
    train_rng, test_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
    train, test = [], []
    for photo in photos:
        width = photo.shape[1]
        train.append(_crops(photo, (0, TRAIN_COLUMNS), train_per_class, train_rng))
        test.append(_crops(photo, (TEST_FROM, width), test_per_class, test_rng))
    labels = [torch.full((c,), k, dtype=torch.int64) for k, c in
              ((0, train_per_class), (1, train_per_class))]
    test_labels = [torch.full((c,), k, dtype=torch.int64) for k, c in
                   ((0, test_per_class), (1, test_per_class))]
    name = (f"scikit-learn's sample photos as two classes ({CLASS_NAMES[0]} vs {CLASS_NAMES[1]}): "
            f"224×224 8-bit crops of side {MIN_SIDE}–{MAX_SIDE} px, mirrored at random; training "
            f"crops from columns 0–{TRAIN_COLUMNS - 1}, test crops from columns {TEST_FROM}–639")
    return PhotoCrops(np.concatenate(train), torch.cat(labels), np.concatenate(test),
                      torch.cat(test_labels), name)
