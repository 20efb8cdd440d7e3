"""agent.npy: the endpoint's .npy reader agrees with np.load on every body np.save writes,
and refuses what np.load refuses; its writer gives np.save's bytes, cached header or not."""

from __future__ import annotations

import io

import numpy as np
import pytest

from agent import npy
from agent.npy import (
    HEADER_CACHE_SIZE,
    MAX_NPZ_MEMBERS,
    NpyError,
    NpyTooLargeError,
    dump_npy,
    load_array_body,
    load_npy,
    load_npz,
)


def _saved(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(5, dtype=np.float64),
    np.array(7, dtype=np.int64),  # a scalar: shape ()
    np.zeros((2, 0, 3), np.uint8),  # empty
    np.array([True, False]),
    np.arange(3, dtype=">f8"),  # big-endian
    np.arange(4, dtype=np.float16),
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),  # Fortran order: numpy's reader
    np.array(["ab", "c"]),  # not numeric: numpy's reader
]
_IDS = [f"{array.dtype.str}{array.shape}" for array in ARRAYS]


@pytest.mark.parametrize("array", ARRAYS, ids=_IDS)
def test_agrees_with_np_load(array: np.ndarray):
    loaded = load_npy(_saved(array))
    assert loaded.dtype == array.dtype and loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)


def test_a_plain_batch_is_a_read_only_view_of_the_body():
    body = _saved(np.ones((256, 64), np.float32))
    loaded = load_npy(body)
    assert not loaded.flags.writeable and not loaded.flags.owndata


@pytest.mark.parametrize(
    "cut", [lambda b: b[:-1], lambda b: b[:9], lambda b: b[:9] + b"\xff\xff{", lambda b: b"x" + b]
)
def test_broken_bodies_raise_what_np_load_raises(cut):
    with pytest.raises((ValueError, OSError, EOFError)):
        load_npy(cut(_saved(np.ones((4, 4), np.float32))))


@pytest.mark.parametrize("array", ARRAYS, ids=_IDS)
def test_writes_what_np_save_writes_before_and_after_caching_the_header(array: np.ndarray):
    assert dump_npy(array) == _saved(array)
    other = np.ones_like(array) if array.dtype.kind != "U" else np.array(["x", "yz"])
    assert dump_npy(other) == _saved(other)  # a known shape: the cached header
    np.testing.assert_array_equal(load_npy(dump_npy(other)), other)


def test_a_known_header_with_a_truncated_body_is_still_refused():
    body = _saved(np.ones((3, 4), np.float32))
    assert load_npy(body).shape == (3, 4)  # the header is cached now
    with pytest.raises(ValueError):
        load_npy(body[:-4])


def test_header_caches_stay_bounded_whatever_the_shapes():
    for rows in range(HEADER_CACHE_SIZE + 10):
        array = np.zeros((rows, 2), np.float32)
        load_npy(dump_npy(array))
    assert 0 < len(npy._read_layouts) <= HEADER_CACHE_SIZE
    assert 0 < len(npy._written_headers) <= HEADER_CACHE_SIZE


# -- untrusted bodies: sizes are checked before anything is allocated --------------------


def test_a_header_declaring_more_data_than_the_body_holds_is_refused_before_allocating():
    body = _saved(np.zeros(4, np.float32)).replace(b"(4,)", b"(4000000000000,)")
    with pytest.raises(NpyError, match=r"declares shape \(4000000000000,\).*16000000000000 bytes"):
        load_npy(body)


def _npz(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_bodies_agree_with_np_load(compressed: bool):
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4),
              "scale": np.ones((3, 1), np.int64)}
    loaded = load_array_body(_npz(compressed, **arrays), 1 << 20)
    assert set(loaded) == {"x", "scale"}
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype


def test_npz_members_declaring_more_than_the_limit_in_all_are_refused():
    body = _npz(True, a=np.zeros(1000, np.float64), b=np.zeros(1000, np.float64))
    assert len(body) < 1000
    with pytest.raises(NpyTooLargeError, match="declare 16256 bytes uncompressed"):
        load_npz(body, 10_000)
    assert set(load_npz(body, 20_000)) == {"a", "b"}


def test_an_npz_with_too_many_members_is_refused_before_its_directory_is_read():
    body = _npz(**{f"m{i}": np.zeros(1, np.uint8) for i in range(MAX_NPZ_MEMBERS + 1)})
    with pytest.raises(NpyError, match=f"{MAX_NPZ_MEMBERS + 1} members"):
        load_npz(body, 1 << 20)


@pytest.mark.parametrize("body", [b"PK\x03\x04" + b"\x00" * 100, b"PK\x05\x06", b"PK\x03\x04"])
def test_a_corrupt_npz_is_an_npy_error(body: bytes):
    with pytest.raises(NpyError):
        load_array_body(body, 1 << 20)
