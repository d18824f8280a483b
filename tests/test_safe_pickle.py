"""The restricted unpickler against memory, CPU and crash bombs, and on the plain data it must still load.

Each hostile pickle is written to a real file and read by the OpenScene reader in a child process whose
address space is limited to what it uses after start-up plus 1 GiB and whose wall time is bounded, so a
bomb cannot take the machine down; the child reports the exception it got. Opcodes are spelled out
(``pickletools.dis`` shows them) where no object would pickle that way.
"""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from bounded_reader import read_in_child

from driveengine.errors import SourceError, UnsafePickleError
from driveengine.sources import safe_pickle
from driveengine.sources.openscene.reader import OPENSCENE_GLOBALS, REQUIRED_KEYS

# -- opcode spelling ----------------------------------------------------------------------------------


def text(s: str) -> bytes:
    """SHORT_BINUNICODE (or BINUNICODE when longer than 255 bytes)."""
    b = s.encode()
    return (b"\x8c" + bytes([len(b)]) if len(b) < 256 else b"X" + struct.pack("<I", len(b))) + b


def get(i: int) -> bytes:
    """LONG_BINGET i."""
    return b"j" + struct.pack("<I", i)


def glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL module.name."""
    return text(module) + text(name) + b"\x93"


def integer(v: int) -> bytes:
    """LONG1 v."""
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def frame_with(token_ops: bytes, prelude: bytes = b"", extra_key_ops: bytes = b"") -> bytes:
    """A one-frame OpenScene file: every required key present, ``token`` pushed by ``token_ops``."""
    pairs = b""
    for key in REQUIRED_KEYS:
        if key == "token":
            value = token_ops
        elif key == "timestamp":
            value = integer(1_620_000_000_000_000)
        elif key in ("roadblock_ids", "traffic_lights"):
            value = b"]"
        elif key == "cams":
            value = b"}"
        else:
            value = text("x")
        pairs += text(key) + value
    return b"\x80\x04" + prelude + b"]}(" + pairs + extra_key_ops + b"ua."


def shared_lists(levels: int) -> bytes:
    """Memo slot k holds L_k = [L_(k-1), L_(k-1)]: a few bytes per level, 2**levels items when followed."""
    ops = b"]\x940"  # EMPTY_LIST MEMOIZE POP: slot 0 = []
    for k in range(levels):
        ops += b"(" + get(k) + get(k) + b"l\x940"  # MARK GET GET LIST MEMOIZE POP
    return ops


def shared_tuples(levels: int) -> bytes:
    """Memo slot k holds T_k = (T_(k-1), T_(k-1)): hashing it visits 2**levels tuples."""
    ops = b")\x940"  # EMPTY_TUPLE MEMOIZE POP
    for k in range(levels):
        ops += get(k) + get(k) + b"\x86\x940"  # GET GET TUPLE2 MEMOIZE POP
    return ops


class _AllocatesByCount:
    def __reduce__(self):
        return (bytearray, (2**31,))


def numpy_array_ops(shape: tuple[int, ...], dtype_name: str, dtype_state: tuple, raw_ops: bytes) -> bytes:
    """``_reconstruct(ndarray, (0,), b"b")`` then BUILD with (1, shape, dtype, False, raw)."""
    dtype = glob("numpy", "dtype") + text(dtype_name) + b"\x89\x88\x87R"  # dtype(name, False, True)
    state = b"("
    for item in dtype_state:
        state += b"N" if item is None else (text(item) if isinstance(item, str) else integer(item))
    dtype += state + b"tb"  # BUILD the dtype with its state
    shape_ops = b"(" + b"".join(integer(d) for d in shape) + b"t"
    return (
        glob("numpy._core.multiarray", "_reconstruct")
        + glob("numpy", "ndarray")
        + integer(0)
        + b"\x85C\x01b\x87R"  # (0,), b"b", TUPLE3, REDUCE
        + b"("
        + integer(1)
        + shape_ops
        + dtype
        + b"\x89"
        + raw_ops
        + b"tb"  # state tuple, BUILD
    )


BOMBS = {
    # 48 bytes: bytearray(2**31) (reached 2.1 GB before it was rejected)
    "bytearray_by_count": (pickle.dumps(_AllocatesByCount(), protocol=4), "allocates by count"),
    # 2**64 items when followed: str() or np.asarray of the token explodes (reached 3 GB in 40 s)
    "memo_shared_lists": (frame_with(get(64), prelude=shared_lists(64)), "shared parts expand"),
    # a dict key whose hash visits 2**64 tuples: the unpickler itself would hash forever
    "shared_tuple_key": (
        frame_with(text("t"), prelude=shared_tuples(64), extra_key_ops=get(64) + text("v")),
        "hashing its dict keys",
    ),
    # LONG_BINPUT 2**31 - 1: CPython's unpickler would zero a 32 GB memo
    "memo_index": (b"\x80\x04Nr" + struct.pack("<I", 2**31 - 1) + b".", "asks for memo slot 2147483647"),
    # the same in protocol 0 text: PUT 99999999999
    "memo_index_text": (b"Np99999999999\n.", "asks for memo slot 99999999999"),
    # numpy array placeholder of 2**34 int8 elements (16 GiB) straight from _reconstruct
    "reconstruct_shape": (
        b"\x80\x04"
        + glob("numpy._core.multiarray", "_reconstruct")
        + glob("numpy", "ndarray")
        + integer(2**34)
        + b"\x85C\x01b\x87R.",
        "numpy._core.multiarray._reconstruct(",
    ),
    # an object array claiming 2**26 items with a list of one (numpy allocates 512 MiB, then crashes)
    "object_array_shape": (
        b"\x80\x04" + numpy_array_ops((2**26,), "O8", (3, "|", None, None, None, -1, -1, 63), b"]Na") + b".",
        "comes with <list of 1> items",
    ),
    # a float array claiming 2**40 elements with 8 bytes of data
    "float_array_shape": (
        b"\x80\x04"
        + numpy_array_ops((2**40,), "f8", (3, "<", None, None, None, -1, -1, 0), b"C\x08" + bytes(8))
        + b".",
        "does not match its size",
    ),
    # an f8 dtype whose state claims it holds Python objects (numpy accepts the forged flags)
    "forged_dtype_flags": (
        b"\x80\x04"
        + numpy_array_ops((1,), "f8", (3, "<", None, None, None, -1, -1, 63), b"C\x08" + bytes(8))
        + b".",
        "forged flags",
    ),
    # numpy.ndarray((2**40,)) called directly
    "ndarray_call": (
        b"\x80\x04" + glob("numpy", "ndarray") + integer(2**40) + b"\x85\x85R.",
        "calls numpy.ndarray(",
    ),
    # a list nested 100,000 deep (recursion in every consumer)
    "deep_nesting": (b"\x80\x04" + b"]" * 100_000 + b"a" * 99_999 + b".", "levels deep"),
    # a list that contains itself
    "cycle": (b"\x80\x04]\x94(" + get(0) + b"e.", "reference cycle"),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_hostile_pickle_fails_fast_with_a_clear_error(tmp_path: Path, name: str) -> None:
    data, words = BOMBS[name]
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(data)
    report = read_in_child("openscene", path)
    assert report["error"] == "UnsafePickleError", report
    assert report["message"].startswith(f"{path}: OpenScene metadata "), report
    assert words in report["message"], report
    assert report["peak_rss_mib"] < 1024, report


def test_bomb_sizes_are_what_the_issue_reports() -> None:
    assert len(BOMBS["bytearray_by_count"][0]) == 48
    assert len(BOMBS["memo_index"][0]) < 16
    # the shared lists are plain data a plain unpickler builds at once (the harm is in following them)
    levels = pickle.loads(b"\x80\x04" + shared_lists(3) + get(3) + b".")
    assert levels == [[[[], []], [[], []]], [[[], []], [[], []]]]


def test_scan_refuses_malformed_streams(tmp_path: Path) -> None:
    path = tmp_path / "x.pkl"
    cases = {
        b"\x80\x04\xff.": "not a pickle opcode",
        b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.": "claims 1099511627776 bytes",
        b"\x80\x04a.": "too few items on the stack",
        b"\x80\x04" + get(5) + b".": "reads memo slot 5, which was never set",
        b"\x80\x04N": "without a STOP",
        b"Np1x\n.": "malformed memo index",
    }
    for data, words in cases.items():
        with pytest.raises(SourceError, match="is not a valid pickle") as info:
            safe_pickle.restricted_loads(data, OPENSCENE_GLOBALS, path, "OpenScene metadata")
        assert words in str(info.value) and str(path) in str(info.value)
        assert not isinstance(info.value, UnsafePickleError)


# -- plain data still loads, exactly as pickle.loads builds it ---------------------------------------------


def same(a: object, b: object) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape, a.flags.writeable, a.flags.f_contiguous) == (
            b.dtype,
            b.shape,
            b.flags.writeable,
            b.flags.f_contiguous,
        )
        if a.dtype.hasobject:
            for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist(), strict=True):
                same(x, y)
        else:
            np.testing.assert_array_equal(a, b)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


PLAIN = {
    "floats": np.linspace(0, 1, 7),
    "big_endian": np.arange(5, dtype=">f8"),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
    "empty": np.zeros((0, 7)),
    "scalar_array": np.array(3.5),
    "bools": np.array([True, False]),
    "complex": np.array([1 + 2j], dtype=np.complex64),
    "unicode": np.array(["CAM_F0", "vehicle"]),
    "bytes_array": np.array([b"ab", b"c"]),
    "objects": np.array(["a", None, [1, 2], np.arange(3)], dtype=object),
    "objects_fortran": np.asfortranarray(np.array([[np.arange(2), "x"], [None, np.ones(1)]], dtype=object)),
    "numpy_scalars": [np.float32(2.5), np.int64(-3), np.bool_(True), np.str_("x")],
    "dtype_value": np.dtype("<u2"),
    "builtins": [1, 2.5, "s", None, True, b"raw", bytearray(b"ba"), 1 + 2j, (1, (2, 3))],
    "sets": [{1, 2}, frozenset({"a"}), {(1, 2)}],
    "nested": {"a": {"b": {"c": [np.ones(2)]}}},
}


@pytest.mark.parametrize("protocol", range(6))
def test_plain_data_loads_exactly_as_pickle_builds_it(tmp_path: Path, protocol: int) -> None:
    shared = np.arange(4.0)
    value = {**PLAIN, "shared": [shared, shared], "frames": [{"token": f"{i:016x}"} for i in range(50)]}
    data = pickle.dumps(value, protocol=protocol)
    got = safe_pickle.restricted_loads(data, OPENSCENE_GLOBALS, tmp_path / "m.pkl")
    same(got, pickle.loads(data))
    assert got["shared"][0] is got["shared"][1]  # one array, however often it is referenced
    got["floats"][0] = 9.0  # writable, as pickle makes it


def test_sharing_within_the_budget_loads(tmp_path: Path) -> None:
    """A part shared many times is fine while the whole, followed, stays within the budget."""
    roadblocks = [f"rb{i}" for i in range(20)]
    frames = [{"roadblock_ids": roadblocks, "token": i} for i in range(5000)]
    data = pickle.dumps(frames, protocol=4)
    got = safe_pickle.restricted_loads(data, OPENSCENE_GLOBALS, tmp_path / "m.pkl")
    assert got[4999]["roadblock_ids"] is got[0]["roadblock_ids"] and len(got) == 5000


def test_the_tree_budget_scales_with_the_file(tmp_path: Path) -> None:
    inner = list(range(1000))
    data = pickle.dumps([inner] * 2000, protocol=4)  # 2M items followed from ~8 KB
    with pytest.raises(UnsafePickleError, match="shared parts expand to more than 1048576 items"):
        safe_pickle.restricted_loads(data, OPENSCENE_GLOBALS, tmp_path / "m.pkl")
    padded = pickle.dumps([[inner] * 2000, "x" * (2 << 20)], protocol=4)  # a 2 MB file may expand that far
    assert len(safe_pickle.restricted_loads(padded, OPENSCENE_GLOBALS, tmp_path / "m.pkl")[0]) == 2000


def test_names_only_allow_list_still_imports_after_the_check(tmp_path: Path) -> None:
    got = safe_pickle.restricted_loads(
        pickle.dumps(OrderedDict(a=1)), {("collections", "OrderedDict")}, tmp_path / "m.pkl"
    )
    assert got == OrderedDict(a=1) and type(got) is OrderedDict


@pytest.mark.parametrize(
    ("ops", "words"),
    [
        (glob("builtins", "str") + b"]\x85R.", "calls builtins.str(<list of 0>)"),
        (
            glob("builtins", "bytes") + integer(2**31) + b"\x85R.",
            "bytes(2147483648), which allocates by count",
        ),
        (glob("builtins", "list") + b"]\x85R.", "calls builtins.list"),
        (glob("_codecs", "encode") + text("x") + text("zlib") + b"\x86R.", "calls _codecs.encode"),
        (glob("numpy", "dtype") + text("(9999,9999)f8") + b"\x85R.", "is not allowed"),
        (glob("numpy", "dtype") + text("V16") + b"\x85R.", "is not allowed"),
    ],
)
def test_guarded_callables_refuse_what_plain_data_never_asks(tmp_path: Path, ops: bytes, words: str) -> None:
    with pytest.raises(UnsafePickleError, match="is refused") as info:
        safe_pickle.restricted_loads(b"\x80\x04" + ops, OPENSCENE_GLOBALS, tmp_path / "m.pkl", "metadata")
    assert words in str(info.value)
