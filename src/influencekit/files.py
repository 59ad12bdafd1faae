"""The user's files for ``influencekit explain`` / ``audit``: a saved model and labelled data.

Nothing untrusted is unpickled. Models: scikit-learn estimators saved with skops
(``.skops``, loaded with skops' default trusted types only), ``torch.export`` archives
(``.pt2``), TorchScript files of standard layers (``.ts``, ``.pt``, ...: rebuilt as eager
modules and checked, see :mod:`influencekit.torchscript`). Data:

- ``.npz``: arrays ``X`` (n, ...) and ``y`` (n,), optionally ``feature_names`` and
  ``class_names``; loaded with ``allow_pickle=False``. ``X`` of shape (n, H, W) or
  (n, H, W, 3) is shown as images.
- ``.csv``: a header row; the label column is ``label_column`` (default: a column named
  "label", else the last one); every other column is a numeric feature named by its header.
- ``.pt``: a dict ``{"X": tensor, "y": tensor}`` or a tuple ``(X, y)``, loaded with
  ``torch.load(weights_only=True)``.
- a folder with one subfolder per class holding ``.png``/``.jpg`` images of one size.
- ``.txt`` / ``.tsv``: one example per line, ``label<TAB>text``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav", ".dill")
TORCHSCRIPT_SUFFIXES = (".ts", ".torchscript", ".jit", ".pt", ".pth")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class UnsafeFileError(InputError):
    """A file whose loading would run arbitrary code (a pickle); the message says how to save
    the model or data in a safe format."""


@dataclass
class Examples:
    """Labelled examples as read from a file.

    ``inputs``: ``(n, ...)`` float array (tables, images) or a list of n strings (text).
    ``labels``: ``(n,)`` array of the labels as written in the file. ``modality``: "table",
    "image" or "text", which decides how the report shows an example. ``images``: ``(n, H, W)``
    or ``(n, H, W, 3)`` in [0, 1] for image data.
    """

    inputs: Any
    labels: np.ndarray
    modality: str
    feature_names: list[str] | None = None
    class_names: list[str] | None = None
    images: np.ndarray | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def _refuse_pickle(path: Path, what: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        advice = ("save a scikit-learn model with skops: skops.io.dump(model, 'model.skops'); "
                  "a PyTorch model with torch.export.save(torch.export.export(model, (x,)), "
                  "'model.pt2')") if what == "model" else (
                  "save arrays with numpy.savez('data.npz', X=X, y=y) or tensors with "
                  "torch.save({'X': X, 'y': y}, 'data.pt')")
        raise UnsafeFileError(
            f"{path} is a pickle file; loading one can run arbitrary code, so influencekit "
            f"never does. Instead, {advice}.")


def load_model(path: str | Path) -> tuple[str, Any]:
    """``("sklearn", estimator)``, ``("torch", nn.Module)`` or ``("torchscript", module)`` (the
    loaded TorchScript module, rebuilt once data is at hand: :mod:`influencekit.torchscript`)
    from a saved model file."""
    path = Path(path)
    _refuse_pickle(path, "model")
    if not path.exists():
        raise InputError(f"Model file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".skops":
        try:
            import skops.io
        except ImportError as error:  # pragma: no cover - skops is a dependency
            raise InputError("Reading .skops models needs skops: pip install skops") from error
        untrusted = skops.io.get_untrusted_types(file=path)
        if untrusted:
            raise UnsafeFileError(
                f"{path} holds types skops does not trust by default: {untrusted}. "
                f"influencekit loads only scikit-learn, numpy and Python built-in types; "
                f"check the file and save a model of supported estimators.")
        return "sklearn", skops.io.load(path)
    if suffix == ".pt2":
        from .exported import exported_module

        return "torch", exported_module(path)
    if suffix in TORCHSCRIPT_SUFFIXES:
        try:
            script = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # a torch.save pickle, or not a model at all
            raise UnsafeFileError(
                f"{path} is not a TorchScript archive ({type(error).__name__}); if it was "
                f"written by torch.save(model), it is a pickle, which influencekit never "
                f"loads. Save the model with torch.jit.save(torch.jit.script(model), ...) or, "
                f"better, torch.export.save(torch.export.export(model, (x,)), "
                f"'model.pt2').") from error
        return "torchscript", script.eval()
    raise InputError(
        f"Unknown model format {path.suffix!r} ({path}). Expected a scikit-learn model saved "
        f"with skops (.skops), a torch.export archive (.pt2), a TorchScript file "
        f"({', '.join(TORCHSCRIPT_SUFFIXES)}), or use --setup module:function for anything "
        f"else.")


def load_examples(path: str | Path, label_column: str | None = None) -> Examples:
    """Labelled examples from ``path`` (see the module docstring for the formats)."""
    path = Path(path)
    _refuse_pickle(path, "data")
    if not path.exists():
        raise InputError(f"Data file {path} does not exist.")
    if path.is_dir():
        return _image_folder(path)
    suffix = path.suffix.lower()
    readers = {".npz": _npz, ".csv": lambda p: _csv(p, label_column), ".pt": _pt,
               ".txt": _text_lines, ".tsv": _text_lines}
    if suffix not in readers:
        raise InputError(
            f"Unknown data format {path.suffix!r} ({path}). Expected .npz (X, y), .csv with a "
            f"label column, .pt ({{'X', 'y'}} tensors), .txt/.tsv lines 'label<TAB>text', or a "
            f"folder with one subfolder of images per class.")
    examples = readers[suffix](path)
    examples.source = str(path)
    if len(examples) == 0:
        raise InputError(f"{path} holds no examples.")
    return examples


def shown_images(X: np.ndarray, channels_first: bool = False) -> np.ndarray | None:
    """``X`` as images to show, ``(n, H, W)`` or ``(n, H, W, 3)`` scaled to [0, 1], or ``None``
    if it does not hold images: ``(n, H, W)``, ``(n, H, W, 1 or 3)``, and with
    ``channels_first`` also ``(n, 1 or 3, H, W)`` (PyTorch's layout)."""
    if channels_first and X.ndim == 4 and X.shape[1] in (1, 3):
        X = np.moveaxis(X, 1, -1)
    if not (X.ndim == 3 or (X.ndim == 4 and X.shape[-1] in (1, 3))):
        return None
    images = X[..., 0] if X.ndim == 4 and X.shape[-1] == 1 else X
    low, high = float(images.min()), float(images.max())
    return (images - low) / (high - low) if high > low else np.zeros_like(images, dtype=float)


def _npz(path: Path) -> Examples:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as error:
        raise UnsafeFileError(
            f"{path} holds object arrays, which only a pickle can read; save numbers and "
            f"strings only (numpy.savez('data.npz', X=X, y=y)).") from error
    missing = [key for key in ("X", "y") if key not in arrays]
    if missing:
        raise InputError(f"{path} must hold arrays named 'X' and 'y'; missing {missing}, "
                         f"found {sorted(arrays)}.")
    X, y = arrays["X"], arrays["y"]
    _same_length(X, y, path)
    images = shown_images(X)
    return Examples(X.astype(np.float64), y, "table" if images is None else "image",
                    feature_names=_names(arrays.get("feature_names")),
                    class_names=_names(arrays.get("class_names")), images=images)


def _names(array: np.ndarray | None) -> list[str] | None:
    return None if array is None else [str(name) for name in array.tolist()]


def _same_length(X: Any, y: Any, path: Path) -> None:
    if len(X) != len(y):
        raise InputError(f"{path}: X has {len(X)} rows but y has {len(y)} labels.")


def _csv(path: Path, label_column: str | None) -> Examples:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise InputError(f"{path} needs a header row and at least one example.")
    header, body = rows[0], rows[1:]
    if label_column is None:
        label_column = "label" if "label" in header else header[-1]
    if label_column not in header:
        raise InputError(f"{path} has no column {label_column!r}; its columns are {header}. "
                         f"Name the label column with --label-column.")
    where = header.index(label_column)
    names = [name for k, name in enumerate(header) if k != where]
    try:
        X = np.array([[float(value) for k, value in enumerate(row) if k != where]
                      for row in body])
    except ValueError as error:
        raise InputError(f"{path}: every column but the label {label_column!r} must be "
                         f"numeric ({error}).") from error
    labels = np.array([row[where] for row in body])
    return Examples(X, _numeric_if_possible(labels), "table", feature_names=names)


def _numeric_if_possible(labels: np.ndarray) -> np.ndarray:
    for kind in (np.int64, np.float64):
        try:
            return labels.astype(kind)
        except ValueError:
            continue
    return labels


def _pt(path: Path) -> Examples:
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises UnpicklingError for anything beyond tensors
        raise UnsafeFileError(
            f"{path} could not be read with torch.load(weights_only=True) ({error}); save "
            f"plain tensors: torch.save({{'X': X, 'y': y}}, '{path.name}').") from error
    if isinstance(payload, dict) and {"X", "y"} <= set(payload):
        X, y = payload["X"], payload["y"]
    elif isinstance(payload, tuple | list) and len(payload) == 2:
        X, y = payload
    else:
        raise InputError(f"{path} must hold {{'X': tensor, 'y': tensor}} or a tuple (X, y).")
    X, y = torch.as_tensor(X).numpy(), torch.as_tensor(y).numpy()
    _same_length(X, y, path)
    images = shown_images(X, channels_first=True)
    return Examples(X.astype(np.float64), y, "table" if images is None else "image",
                    images=images)


def _image_folder(path: Path) -> Examples:
    from PIL import Image

    classes = sorted(child.name for child in path.iterdir() if child.is_dir())
    if not classes:
        raise InputError(f"{path} is a folder without class subfolders; expected "
                         f"{path}/<class>/<image>.png.")
    images, labels, size, mode = [], [], None, None
    for label in classes:
        for file in sorted((path / label).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(file) as image:
                mode = mode or ("L" if image.mode in ("L", "1", "P") else "RGB")
                array = np.asarray(image.convert(mode), dtype=np.float64) / 255.0
            if size is None:
                size = array.shape
            elif array.shape != size:
                raise InputError(f"{file} is {array.shape[:2]} pixels, the first image "
                                 f"{size[:2]}; every image must have the same size.")
            images.append(array)
            labels.append(label)
    if not images:
        raise InputError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {path}.")
    X = np.stack(images)
    return Examples(X, np.array(labels), "image", class_names=classes, images=X)


def _text_lines(path: Path) -> Examples:
    labels, texts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise InputError(f"{path}:{number}: expected 'label<TAB>text', got {line[:60]!r}.")
        label, text = line.split("\t", 1)
        labels.append(label)
        texts.append(text)
    return Examples(texts, _numeric_if_possible(np.array(labels)), "text")
