"""Tests for the CIFAR-10 reader in training/data.py, on miniatures written in the official format.

The real dataset is never downloaded here; every file is made by the tests in ``tmp_path``.
"""

import hashlib
import io
import os
import pickle
import struct
import tarfile
from functools import partial

import numpy as np
import pytest
import torch

from training import data
from training.data import DatasetUnavailableError

# Images per training batch (deliberately unequal, so batch order shows) and in the test batch.
TRAIN_SIZES = (3, 1, 2, 2, 4)
TEST_SIZE = 3


class _Python2Pickler(pickle._Pickler):
    """Writes every str and bytes as a Python 2 byte string, as in the official files.

    Python 2's cPickle wrote them, so their keys, names and the arrays' raw pixels are all
    BINSTRING records, which Python 3 must decode to str (the reader uses latin1).
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_byte_string(self, text):
        raw = text.encode("latin1") if isinstance(text, str) else text
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(text)

    dispatch[str] = _save_byte_string
    dispatch[bytes] = _save_byte_string


def _dumps_python2(obj):
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _dumps_python3(obj, protocol=2):
    """Pickles `obj` as Python 3 re-pickling a file loaded with ``encoding="bytes"`` would."""
    return pickle.dumps({name.encode("latin1"): value for name, value in obj.items()}, protocol)


def _pickle_batch(images, labels, dumps=_dumps_python3, label_type=list):
    """Pickles one batch in the official layout: a dict of uint8 ``data`` and a list of labels."""
    batch = {
        "batch_label": "miniature batch",
        "labels": label_type(labels),
        "data": images,
        "filenames": [f"image_{index}.png" for index in range(len(images))],
    }
    return dumps(batch)


def _pickle_meta(names=data.CIFAR10_CLASSES, dumps=_dumps_python3):
    return dumps({"num_cases_per_batch": 10000, "label_names": list(names), "num_vis": 3072})


def _write_miniature(folder, dumps=_dumps_python3, label_type=list, seed=0):
    """Writes a complete miniature CIFAR-10 into `folder`; returns its images and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, size in [*zip(data._CIFAR10_TRAIN_BATCHES, TRAIN_SIZES), ("test_batch", TEST_SIZE)]:
        images = rng.integers(0, 256, (size, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size).tolist()
        (folder / name).write_bytes(_pickle_batch(images, labels, dumps, label_type))
        written[name] = (images, labels)
    (folder / "batches.meta").write_bytes(_pickle_meta(dumps=dumps))
    return written


@pytest.fixture
def miniature(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    return folder, _write_miniature(folder)


@pytest.mark.parametrize(
    "dumps, label_type",
    [(_dumps_python2, list), (_dumps_python3, list), (_dumps_python3, np.array)],
    ids=["python2", "python3", "label-array"],
)
def test_reads_miniature_exactly(tmp_path, dumps, label_type):
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_miniature(folder, dumps, label_type)

    dataset = data.load_cifar10(folder, official=False)

    train = [written[name] for name in data._CIFAR10_TRAIN_BATCHES]
    expected_train = np.concatenate([images for images, _ in train])
    assert dataset.name == "cifar10"
    assert dataset.train_images.dtype == torch.float32
    assert dataset.train_images.shape == (sum(TRAIN_SIZES), 3072)
    torch.testing.assert_close(
        dataset.train_images, torch.from_numpy(expected_train).float() / 255, rtol=0, atol=0
    )
    assert dataset.train_labels.dtype == torch.int64
    assert dataset.train_labels.tolist() == [label for _, labels in train for label in labels]
    test_images, test_labels = written["test_batch"]
    torch.testing.assert_close(
        dataset.test_images, torch.from_numpy(test_images).float() / 255, rtol=0, atol=0
    )
    assert dataset.test_labels.tolist() == test_labels


def test_rows_are_rgb_planes_in_row_major_order(miniature):
    folder, _ = miniature
    # An image whose planes tell themselves apart: red is constant, green gives the row, blue the
    # column.
    rows, columns = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    planes = np.stack([np.full((32, 32), 200), rows, 100 + columns]).astype(np.uint8)
    (folder / "test_batch").write_bytes(_pickle_batch(planes.reshape(1, 3072), [6]))

    images = data.load_cifar10(folder, official=False).test_images.view(-1, 3, 32, 32)

    torch.testing.assert_close(images[0], torch.from_numpy(planes).float() / 255, rtol=0, atol=0)
    assert images[0, 1, 5, 0] == 5 / 255 and images[0, 2, 0, 7] == 107 / 255


def test_finds_folder_from_parent_environment_and_load_dataset(miniature, monkeypatch):
    folder, written = miniature
    first_label = written["data_batch_1"][1][0]
    assert data.load_cifar10(folder.parent, official=False).train_labels[0] == first_label

    monkeypatch.setenv("FLATOPT_CIFAR10_DIR", str(folder))
    assert data.load_cifar10(official=False).train_labels[0] == first_label

    # load_dataset reads <root>/cifar-10-batches-py and accepts only the official files.
    monkeypatch.delenv("FLATOPT_CIFAR10_DIR")
    with pytest.raises(DatasetUnavailableError, match=r"batches\.meta: checksum mismatch"):
        data.load_dataset("cifar10", folder.parent)


def test_official_files_are_checked_before_unpickling(miniature):
    folder, _ = miniature
    marker = folder / "pwned"
    (folder / "batches.meta").write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}")))

    with pytest.raises(DatasetUnavailableError, match=r"checksum mismatch.*official=False"):
        data.load_cifar10(folder)
    assert not marker.exists()


def test_official_set_must_have_the_official_sizes(miniature, monkeypatch):
    folder, _ = miniature
    # Make the miniature pass the checksums, so that the size check is what refuses it.
    digests = {
        name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in data._CIFAR10_FILES
    }
    monkeypatch.setattr(data, "_CIFAR10_MD5", digests)

    with pytest.raises(DatasetUnavailableError, match=r"hold 12 training and 3 test images"):
        data.load_cifar10(folder)


def test_missing_folder_says_where_to_put_the_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATOPT_CIFAR10_DIR", str(tmp_path / "nowhere"))

    with pytest.raises(DatasetUnavailableError) as raised:
        data.load_cifar10()

    message = str(raised.value)
    assert f"{tmp_path / 'nowhere'} does not exist" in message
    assert "without internet access" in message
    assert data.CIFAR10_ARCHIVE_MD5 in message and "test_batch" in message
    assert "FLATOPT_CIFAR10_DIR" in message


def test_missing_batch_is_named(miniature):
    folder, _ = miniature
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetUnavailableError, match=r"lacks data_batch_3\."):
        data.load_cifar10(folder, official=False)


class _RunsCommand:
    """Unpickling an instance runs a shell command, as a tampered batch could."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_refuses_a_pickle_that_would_run_code(miniature):
    folder, _ = miniature
    marker = folder / "pwned"
    (folder / "data_batch_2").write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}"), 2))

    with pytest.raises(DatasetUnavailableError, match=r"data_batch_2.*Refusing to load") as raised:
        data.load_cifar10(folder, official=False)
    assert isinstance(raised.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


@pytest.mark.parametrize(
    "blob",
    [
        b"not a pickle at all",
        _pickle_batch(np.zeros((2, 3072), np.uint8), [1, 2])[:-40],
        b"",
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_refuses_a_corrupt_file(miniature, blob):
    folder, _ = miniature
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(DatasetUnavailableError, match=r"test_batch is not a readable CIFAR-10"):
        data.load_cifar10(folder, official=False)


@pytest.mark.parametrize(
    "blob, problem",
    [
        (_pickle_batch(np.zeros((2, 3071), np.uint8), [1, 2]), r"shape \(n, 3072\).*\(2, 3071\)"),
        (_pickle_batch(np.zeros((2, 3, 32, 32), np.uint8), [1, 2]), r"\(2, 3, 32, 32\)"),
        (_pickle_batch(np.zeros((2, 3072), np.float32), [1, 2]), r"not float32 array"),
        # Protocol 4: Python 3's protocol 2 pickles empty bytes as a call to bytes(), refused.
        (
            _pickle_batch(np.zeros((0, 3072), np.uint8), [], partial(_dumps_python3, protocol=4)),
            r"\(0, 3072\)",
        ),
        (_pickle_batch(np.zeros((2, 3072), np.uint8), [1]), r"list of 2 integers"),
        (_pickle_batch(np.zeros((2, 3072), np.uint8), [1.0, 2.0]), r"list of 2 integers"),
        (_pickle_batch(np.zeros((2, 3072), np.uint8), [3, 10]), r"\[10\], outside the classes"),
        (_pickle_batch(np.zeros((2, 3072), np.uint8), [-1, 0]), r"\[-1\], outside the classes"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, 2), r"no 'labels' entry"),
        (pickle.dumps([np.zeros((2, 3072), np.uint8), [1, 2]], 2), r"holds a list, not a dict"),
    ],
    ids=[
        "short-rows",
        "image-shaped",
        "float",
        "empty",
        "too-few-labels",
        "float-labels",
        "label-10",
        "negative-label",
        "no-labels",
        "not-a-dict",
    ],
)
def test_refuses_a_batch_in_the_wrong_format(miniature, blob, problem):
    folder, _ = miniature
    (folder / "data_batch_4").write_bytes(blob)
    with pytest.raises(DatasetUnavailableError, match=rf"data_batch_4 is not .*{problem}"):
        data.load_cifar10(folder, official=False)


def test_refuses_meta_without_ten_class_names(miniature):
    folder, _ = miniature
    (folder / "batches.meta").write_bytes(_pickle_meta(data.CIFAR10_CLASSES[:9]))
    with pytest.raises(DatasetUnavailableError, match=r"batches\.meta .*10 class names"):
        data.load_cifar10(folder, official=False)


def _tar_gz(members):
    """A gzipped tar archive of (TarInfo, content or None) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            archive.addfile(info, io.BytesIO(content) if content is not None else None)
    buffer.seek(0)
    return buffer


def test_extraction_writes_only_the_batches_into_the_folder(miniature, tmp_path):
    source, written = miniature
    members = [
        (tarfile.TarInfo(f"cifar-10-batches-py/{name}"), (source / name).read_bytes())
        for name in data._CIFAR10_FILES
    ]
    members += [
        (tarfile.TarInfo("cifar-10-batches-py/../../escaped"), b"outside"),
        (tarfile.TarInfo("/tmp/absolute"), b"outside"),
        (tarfile.TarInfo("cifar-10-batches-py/readme.html"), b"extra"),
    ]
    target = tmp_path / "extracted" / "cifar-10-batches-py"
    target.mkdir(parents=True)

    data._extract_cifar10(_tar_gz(members), target)

    assert sorted(path.name for path in target.iterdir()) == sorted(data._CIFAR10_FILES)
    assert not (tmp_path / "escaped").exists()
    labels = data.load_cifar10(target, official=False).test_labels.tolist()
    assert labels == written["test_batch"][1]


def test_extraction_refuses_a_link_in_place_of_a_batch(tmp_path):
    link = tarfile.TarInfo("cifar-10-batches-py/test_batch")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"

    with pytest.raises(DatasetUnavailableError, match="not a regular file"):
        data._extract_cifar10(_tar_gz([(link, None)]), tmp_path)
    assert not (tmp_path / "test_batch").exists()
