"""Images for the ResNet experiment (Table 9).

Offline defaults: scikit-learn's 8×8 handwritten digits (1797 images, 10 classes; shipped
inside the package, optional extra ``optclip[digits]``) when installed; otherwise a synthetic
10-class task of oriented bars and blobs on noise (documented in ``synthetic_shapes``). The
paper's CIFAR-10 is read from a local `datasets` folder.
"""

from __future__ import annotations

import numpy as np

from optclip.data.common import content_hash, load_local_dataset


def digits():
  """(images NHWC float32 in [0, 1], labels, info) from sklearn's digits, or None."""
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    return None
  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  return images, labels, {"source": "sklearn.datasets.load_digits", "size": len(labels),
                          "sha256": content_hash([images.tobytes()])}


def synthetic_shapes(n: int = 2000, size: int = 12, *, seed: int = 0):
  """A 10-class image task: class c is a bar at angle c·18° (c < 5) or a blob at one of five
  positions (c ≥ 5), with random thickness and Gaussian pixel noise (σ = 0.3)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, size=n).astype(np.int32)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
  images = np.empty((n, size, size, 1), np.float32)
  centres = [(0, 0), (-3, -3), (-3, 3), (3, -3), (3, 3)]
  for i, c in enumerate(labels):
    width = rng.uniform(0.8, 1.6)
    if c < 5:
      angle = np.deg2rad(18 * c)
      distance = np.abs(xx * np.sin(angle) - yy * np.cos(angle))
      image = np.exp(-(distance / width) ** 2)
    else:
      cy, cx = centres[c - 5]
      image = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
    images[i, ..., 0] = image + 0.3 * rng.normal(size=(size, size))
  return images, labels, {"source": f"synthetic shapes (n={n}, size={size}, seed={seed})",
                          "size": n, "sha256": content_hash([images.tobytes()])}


CIFAR10 = ("python -c \"import datasets; datasets.load_dataset('cifar10')"
           ".save_to_disk('DATA/cifar10')\"")


def cifar10(data_dir: str | None):
  """CIFAR-10 from ``data_dir/cifar10``: every split of the hub's DatasetDict (train and
  test), ``img`` (32×32 RGB) and ``label``."""
  data, path, splits = load_local_dataset(data_dir, "cifar10", CIFAR10, ("img", "label"))
  data = data.with_format("numpy")
  images = np.asarray(data["img"], np.float32) / 255.0
  labels = np.asarray(data["label"], np.int32)
  return images, labels, {"source": path, "splits": splits, "size": len(labels),
                          "sha256": content_hash([images[:16].tobytes()])}
