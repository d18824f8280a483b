"""Compiled opcode scan of an untrusted pickle (used by :mod:`driveengine.sources.safe_pickle`).

The kernel walks the opcodes once, as CPython's unpickler would, keeping per stack slot and memo slot
only two numbers: the work of hashing the object (tuples: one plus that of their items, so shared parts
count each time they are reached) and its tuple nesting. It refuses what CPython's unpickler would turn
into a memory or CPU bomb before any object is built:

* a memo slot beyond the number of slots set so far (``LONG_BINPUT 2**31`` makes CPython zero 32 GB);
* lengths that run past the end of the data (CPython allocates the claimed size before reading);
* tuples nested deeper than a limit (their hash recurses in C);
* hashing work (dict keys, set items) beyond a limit (nested shared tuples hash in exponential time);

and reports malformed streams (unknown opcode, stack underflow, unset memo slot, no STOP), which CPython
would refuse too. This module imports numba; import it only when a pickle is to be read.
"""

from __future__ import annotations

import pickle
import pickletools

import numba
import numpy as np

# Argument kinds of the opcodes (from pickletools' descriptions).
ARG_NONE, ARG_FIXED, ARG_LINE, ARG_TWO_LINES, ARG_LEN1, ARG_LEN4S, ARG_LEN4U, ARG_LEN8U = range(8)

# Results (element 0 of the kernel's output).
(
    OK,
    BAD_OPCODE,
    TRUNCATED,
    MEMO_BOMB,
    UNDERFLOW,
    NO_MEMO,
    HASH_BOMB,
    TOO_DEEP,
    NO_STOP,
    BAD_INDEX,
    NEGATIVE,
) = range(11)

#: Opcode byte -> name, for messages.
OPCODE_NAME: dict[int, str] = {ord(op.code): op.name for op in pickletools.opcodes}


def _argument_tables() -> tuple[np.ndarray, np.ndarray]:
    of_n = {
        pickletools.TAKEN_FROM_ARGUMENT1: ARG_LEN1,
        pickletools.TAKEN_FROM_ARGUMENT4: ARG_LEN4S,
        pickletools.TAKEN_FROM_ARGUMENT4U: ARG_LEN4U,
        pickletools.TAKEN_FROM_ARGUMENT8U: ARG_LEN8U,
    }
    kind = np.full(256, -1, dtype=np.int64)  # -1: not an opcode
    size = np.zeros(256, dtype=np.int64)
    for op in pickletools.opcodes:
        code, arg = ord(op.code), op.arg
        if arg is None:
            kind[code] = ARG_NONE
        elif arg.n >= 0:
            kind[code], size[code] = ARG_FIXED, arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            kind[code] = ARG_TWO_LINES if arg.name == "stringnl_noescape_pair" else ARG_LINE
        else:
            kind[code] = of_n[arg.n]
    return kind, size


_ARG_KIND, _ARG_SIZE = _argument_tables()

MARK, STOP, POP, POP_MARK, DUP = (
    ord(c) for c in (pickle.MARK, pickle.STOP, pickle.POP, pickle.POP_MARK, pickle.DUP)
)
TUPLE, TUPLE1, TUPLE2, TUPLE3 = (ord(c) for c in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3))
LIST, DICT, FROZENSET, INST, OBJ = (
    ord(c) for c in (pickle.LIST, pickle.DICT, pickle.FROZENSET, pickle.INST, pickle.OBJ)
)
APPEND, APPENDS, SETITEM, SETITEMS, ADDITEMS = (
    ord(c) for c in (pickle.APPEND, pickle.APPENDS, pickle.SETITEM, pickle.SETITEMS, pickle.ADDITEMS)
)
BUILD, REDUCE, NEWOBJ, STACK_GLOBAL, NEWOBJ_EX = (
    ord(c) for c in (pickle.BUILD, pickle.REDUCE, pickle.NEWOBJ, pickle.STACK_GLOBAL, pickle.NEWOBJ_EX)
)
BINPERSID, READONLY_BUFFER, FRAME, PROTO = (
    ord(c) for c in (pickle.BINPERSID, pickle.READONLY_BUFFER, pickle.FRAME, pickle.PROTO)
)
PUT, BINPUT, LONG_BINPUT, MEMOIZE = (
    ord(c) for c in (pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE)
)
GET, BINGET, LONG_BINGET = (ord(c) for c in (pickle.GET, pickle.BINGET, pickle.LONG_BINGET))

# Stack effects: the frequent ones first in the kernel (one table look-up per opcode).
E_PUSH, E_PUT, E_GET, E_OTHER = range(4)
_EFFECT = np.full(256, E_PUSH, dtype=np.int64)
_EFFECT[[PUT, BINPUT, LONG_BINPUT, MEMOIZE]] = E_PUT
_EFFECT[[GET, BINGET, LONG_BINGET]] = E_GET
_EFFECT[
    [MARK, STOP, POP, POP_MARK, DUP, TUPLE, TUPLE1, TUPLE2, TUPLE3, LIST, DICT, FROZENSET, INST, OBJ, APPEND,
     APPENDS, SETITEM, SETITEMS, ADDITEMS, BUILD, REDUCE, NEWOBJ, STACK_GLOBAL, NEWOBJ_EX, BINPERSID,
     READONLY_BUFFER, FRAME, PROTO]
] = E_OTHER  # fmt: skip

_CAP = np.int64(1) << np.int64(55)  # saturation of hash costs (packed above 7 bits of depth)
_NO_INDEX = np.int64(-1)


@numba.njit
def _grow(a: np.ndarray, need: int) -> np.ndarray:
    """``a`` if index ``need`` fits, else a copy at least twice as long."""
    if need < a.size:
        return a
    b = np.empty(max(2 * a.size, need + 1), dtype=a.dtype)
    b[: a.size] = a
    return b


@numba.njit
def _uint_le(data: np.ndarray, at: int, width: int) -> np.int64:
    v = np.int64(0)
    for k in range(width - 1, -1, -1):
        v = (v << np.int64(8)) | np.int64(data[at + k])
    return v


@numba.njit
def _decimal(data: np.ndarray, start: int, end: int) -> np.int64:
    """The decimal digits in ``data[start:end]`` (at most 18), or -1 if anything else is there."""
    if end <= start or end - start > 18:
        return _NO_INDEX
    v = np.int64(0)
    for i in range(start, end):
        d = np.int64(data[i]) - np.int64(48)
        if d < 0 or d > 9:
            return _NO_INDEX
        v = v * np.int64(10) + d
    return v


_SIGNATURE = numba.void(
    numba.types.Array(numba.uint8, 1, "C", readonly=True), numba.int64, numba.int64, numba.int64[::1]
)

# A stack or memo slot packs the hash cost (high bits, saturating) and the tuple nesting (low 7 bits).
_DEPTH_BITS = np.int64(7)
_DEPTH_MASK = np.int64(127)
_LEAF = (np.int64(1) << _DEPTH_BITS) | np.int64(1)  # cost 1, depth 1
_UNSET = np.int64(-1)


@numba.njit(_SIGNATURE, cache=True, nogil=True)
def scan_kernel(data: np.ndarray, hash_limit: int, max_depth: int, out: np.ndarray) -> None:
    """Scan ``data``; ``out`` receives (result, opcode offset, opcode, opcodes read, detail, end, hash work).

    ``detail`` is the offending memo index, claimed length, hash work or depth, depending on the result.
    ``max_depth`` must be below 127.
    """
    n = data.size
    st = np.empty(256, dtype=np.int64)  # the stack: packed (cost, depth) per object
    sp = 0
    marks = np.empty(64, dtype=np.int64)
    mp = 0
    memo = np.full(256, _UNSET, dtype=np.int64)
    mlen = 0  # distinct memo slots set (CPython's memo_len)
    work = np.int64(0)
    ops = 0
    pos = 0
    status = NO_STOP
    code = np.int64(0)
    start = 0
    detail = np.int64(0)
    while pos < n:
        start = pos
        code = np.int64(data[pos])
        pos += 1
        ops += 1
        kind = _ARG_KIND[code]
        arg_start = pos
        arg_end = pos
        if kind < 0:
            status = BAD_OPCODE
            break
        if kind == ARG_FIXED:
            arg_end = pos + _ARG_SIZE[code]
            if arg_end > n:
                status = TRUNCATED
                break
            pos = arg_end
        elif kind == ARG_LINE or kind == ARG_TWO_LINES:
            lines = 1 if kind == ARG_LINE else 2
            while lines > 0 and pos < n:
                if data[pos] == 10:
                    lines -= 1
                    arg_end = pos
                pos += 1
            if lines > 0:
                status = TRUNCATED
                break
        elif kind != ARG_NONE:
            width = 1 if kind == ARG_LEN1 else (8 if kind == ARG_LEN8U else 4)
            if pos + width > n:
                status = TRUNCATED
                break
            length = _uint_le(data, pos, width)
            if kind == ARG_LEN4S and length >= (np.int64(1) << np.int64(31)):
                status = NEGATIVE
                break
            pos += width
            if length > n - pos:
                status = TRUNCATED
                detail = length
                break
            pos += length

        effect = _EFFECT[code]
        if effect == E_PUSH:  # scalars, strings, empty containers, globals: one new object
            if sp >= st.size:
                st = _grow(st, sp)
            st[sp] = _LEAF
            sp += 1
            continue
        fence = marks[mp - 1] if mp > 0 else 0
        if effect == E_PUT:
            if sp <= fence:
                status = UNDERFLOW
                break
            if code == MEMOIZE:
                idx = np.int64(mlen)
            elif code == BINPUT:
                idx = np.int64(data[arg_start])
            elif code == LONG_BINPUT:
                idx = _uint_le(data, arg_start, 4)
            else:  # decimal digits only (CPython also takes a sign, blanks and "_": refused here)
                idx = _decimal(data, arg_start, arg_end)
                if idx < 0:
                    status = BAD_INDEX
                    break
            if idx > mlen:  # picklers number their memo slots 0, 1, 2, ...
                status = MEMO_BOMB
                detail = idx
                break
            if idx >= memo.size:
                grown = np.full(2 * memo.size, _UNSET, dtype=np.int64)
                grown[: memo.size] = memo
                memo = grown
            if memo[idx] == _UNSET:
                mlen += 1
            memo[idx] = st[sp - 1]
        elif effect == E_GET:
            if code == BINGET:
                idx = np.int64(data[arg_start])
            elif code == LONG_BINGET:
                idx = _uint_le(data, arg_start, 4)
            else:
                idx = _decimal(data, arg_start, arg_end)
                if idx < 0:
                    status = BAD_INDEX
                    break
            if idx >= memo.size or memo[idx] == _UNSET:
                status = NO_MEMO
                detail = idx
                break
            if sp >= st.size:
                st = _grow(st, sp)
            st[sp] = memo[idx]
            sp += 1
        elif code == TUPLE1 or code == TUPLE2 or code == TUPLE3 or code == TUPLE:
            if code == TUPLE:
                if mp == 0 or marks[mp - 1] > sp:
                    status = UNDERFLOW
                    break
                mp -= 1
                first = marks[mp]
            else:
                first = sp - (1 if code == TUPLE1 else (2 if code == TUPLE2 else 3))
                if first < fence:
                    status = UNDERFLOW
                    break
            c = np.int64(1)
            d = np.int64(1)
            for i in range(first, sp):
                c = min(c + (st[i] >> _DEPTH_BITS), _CAP)
                d = max(d, (st[i] & _DEPTH_MASK) + 1)
            if d > max_depth:
                status = TOO_DEEP
                detail = d
                break
            sp = first
            if sp >= st.size:
                st = _grow(st, sp)
            st[sp] = (c << _DEPTH_BITS) | d
            sp += 1
        elif code == MARK:
            if mp >= marks.size:
                marks = _grow(marks, mp)
            marks[mp] = sp
            mp += 1
        elif code == REDUCE or code == NEWOBJ or code == STACK_GLOBAL or code == NEWOBJ_EX:
            k = 3 if code == NEWOBJ_EX else 2
            if sp - k < fence:
                status = UNDERFLOW
                break
            sp -= k
            st[sp] = _LEAF
            sp += 1
        elif code == APPEND or code == BUILD:
            if sp - 2 < fence:
                status = UNDERFLOW
                break
            sp -= 1
        elif (
            code == SETITEMS or code == APPENDS or code == LIST or code == DICT or code == FROZENSET
            or code == ADDITEMS or code == INST or code == OBJ
        ):  # fmt: skip
            if mp == 0 or marks[mp - 1] > sp:
                status = UNDERFLOW
                break
            mp -= 1
            first = marks[mp]
            if code == DICT or code == SETITEMS or code == FROZENSET or code == ADDITEMS:
                step = 2 if (code == DICT or code == SETITEMS) else 1
                for i in range(first, sp, step):  # keys (items) are hashed, shared tuples in full
                    work = min(work + (st[i] >> _DEPTH_BITS), _CAP)
                if work > hash_limit:
                    status = HASH_BOMB
                    detail = work
                    break
            if code == OBJ and sp - first < 1:  # OBJ needs the class above its mark
                status = UNDERFLOW
                break
            sp = first
            if code == APPENDS or code == SETITEMS or code == ADDITEMS:
                if sp < 1:  # the container sits below the mark
                    status = UNDERFLOW
                    break
            else:  # a new list, dict, frozenset (its hash is cached) or instance
                if sp >= st.size:
                    st = _grow(st, sp)
                st[sp] = _LEAF
                sp += 1
        elif code == SETITEM:
            if sp - 3 < fence:
                status = UNDERFLOW
                break
            work = min(work + (st[sp - 2] >> _DEPTH_BITS), _CAP)
            if work > hash_limit:
                status = HASH_BOMB
                detail = work
                break
            sp -= 2
        elif code == STOP:
            status = OK
            break
        elif code == POP:
            if mp > 0 and marks[mp - 1] == sp:
                mp -= 1
            elif sp <= fence:
                status = UNDERFLOW
                break
            else:
                sp -= 1
        elif code == POP_MARK:
            if mp == 0 or marks[mp - 1] > sp:
                status = UNDERFLOW
                break
            mp -= 1
            sp = marks[mp]
        elif code == DUP:
            if sp <= fence:
                status = UNDERFLOW
                break
            if sp >= st.size:
                st = _grow(st, sp)
            st[sp] = st[sp - 1]
            sp += 1
        elif code == BINPERSID or code == READONLY_BUFFER:
            if sp <= fence:
                status = UNDERFLOW
                break
            st[sp - 1] = _LEAF
        elif code == FRAME:
            if _uint_le(data, arg_start, 8) > n - pos:
                status = TRUNCATED
                break
        # PROTO: nothing to do
    out[0] = status
    out[1] = start
    out[2] = code
    out[3] = ops
    out[4] = detail
    out[5] = pos
    out[6] = work
