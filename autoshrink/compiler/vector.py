"""Table-lookup kernels for CPUs with AVX-512: a Linear whose weights are codes into a table
(k-means or uniform codebooks, ternary codes); the lookups the sparse kernels
(:mod:`autoshrink.compiler.sparse`) share.

MetaSchedule cannot find these: the lookup of 16 weights at once is one ``vpermps`` whose
table sits in a register (``vpermi2ps`` for 32 entries), which no loop schedule of a gather
turns into. So the kernels are written out, and the per-layer choice
(:mod:`autoshrink.compiler.choice`) times them against the tuned dense kernel like any other
form. Tables of up to 256 entries (8-bit codes) are looked up in registers too where the CPU
has AVX-512 VBMI: the table is split into its four byte planes, each looked up 64 codes at a
time (``vpermi2b`` twice and a blend on the top bit; once for at most 128 entries), and the
planes are interleaved back into floats (``vpunpck*``). Without VBMI they are read from
memory, one load per weight.

Layout of the codes of a dense layer (what the bundle stores for it): output rows in groups
of 16, one per vector lane; columns in chunks of ``32 // bits``. Word ``(g, c, l)`` (int32)
holds, at bits ``s * bits``, the code of row ``16 g + l`` and column ``c * (32 // bits) + s``.
Rows and columns past the layer's are padded with code 0 and never stored to the output.
With byte planes the 64 codes of a chunk (16 rows x 4 columns) are in the order the unpacks
give back: byte ``16 * (l // 4) + 4 * s + l % 4`` holds row lane ``l``, column ``s``.

The dense kernel is an outer product per chunk: the 16 weights of one column for 16 rows are
looked up once and multiplied into ``tile`` batch rows' accumulators (``x`` broadcast), so for
a batch the lookups cost little beside the multiplications, and at batch 1 four partial sums
keep the multipliers busy. The weight never exists in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

__all__ = [
    "LANES",
    "MAX_REGISTER_TABLE",
    "MAX_TABLE",
    "kernel_table",
    "lanes",
    "pack_codes",
    "split_tasks",
    "table_entries",
    "pack_values",
    "table_linear",
    "table_values",
    "table_values_length",
    "vector_lookup",
]

#: float32 lanes of a 512-bit register: the rows a group holds.
LANES = 16
#: Largest table: codes of up to 8 bits.
MAX_TABLE = 256
#: Largest table looked up in float registers (``vpermps``, ``vpermi2ps``). Larger ones are
#: looked up as byte planes (VBMI) or read from memory, once per weight.
MAX_REGISTER_TABLE = 32
#: Bytes a 512-bit register holds: the codes one byte-plane lookup reads.
BYTES = 64
#: Multiply-adds below which a kernel runs on one thread.
PARALLEL_WORK = 1 << 17
#: Most parallel tasks a kernel splits its rows into: enough to balance 16 threads, few
#: enough that each task's scratch buffers are allocated rarely.
TASKS = 64


def split_tasks(units: int, work: int) -> tuple[int, int]:
    """``(tasks, units per task)`` for ``units`` rows (or row groups) of ``work``
    multiply-adds in all: one task for small products, where waking the pool costs more than
    it saves."""
    per = -(-units // min(units, TASKS)) if work >= PARALLEL_WORK else units
    return -(-units // per), per


def _bits(table_size: int, vbmi: bool) -> int:
    """Code width for a table of ``table_size`` entries (1 to 8 bits; a byte for byte
    planes)."""
    return 8 if _planes(table_size, vbmi) else max(1, int(table_size - 1).bit_length())


def _planes(table_size: int, vbmi: bool) -> bool:
    """Whether a table is looked up as byte planes: more than fits two float registers, on a
    CPU with VBMI."""
    return vbmi and table_size > MAX_REGISTER_TABLE


def table_entries(table_size: int) -> int:
    """Entries the kernel's table holds (the codebook padded with zeros): 16 for one
    register, 32 for two, 256 for byte planes or memory."""
    return 16 if table_size <= 16 else 32 if table_size <= 32 else MAX_TABLE


def kernel_table(table: np.ndarray, vbmi: bool = False) -> np.ndarray:
    """A codebook as the kernels read it: float32 padded with zeros to
    :func:`table_entries`; as byte planes (int8, plane ``p`` holding byte ``p`` of every
    entry) when it is looked up with VBMI."""
    padded = np.zeros(table_entries(int(table.size)), np.float32)
    padded[: table.size] = table
    if not _planes(int(table.size), vbmi):
        return padded
    return np.ascontiguousarray(padded.view(np.int8).reshape(MAX_TABLE, 4).T).reshape(-1)


def vector_lookup(table_size: int) -> Callable:
    """``(table, codes) -> float32x16``: the entries of 16 int32 codes. Up to 16 entries: one
    ``vpermps`` from a register; up to 32: ``vpermi2ps`` from two; else one load per lane
    from the table in memory (L1-resident; 15 % faster here than ``vgatherdps``)."""
    if table_size <= 16:
        return lambda table, codes: tirx.call_llvm_pure_intrin(
            "float32x16", "llvm.x86.avx512.permvar.sf.512", table[lanes(0)], codes
        )
    if table_size <= 32:
        return lambda table, codes: tirx.call_llvm_pure_intrin(
            "float32x16", "llvm.x86.avx512.vpermi2var.ps.512",
            table[lanes(0)], codes, table[lanes(16)],
        )
    return lambda table, codes: table[codes]


def lanes(start: Any, count: int = LANES) -> Any:
    """The ``count`` consecutive indices from ``start``, as one vector index."""
    return tirx.Ramp(start, 1, count)


def _chunk_lookup(table_size: int, vbmi: bool) -> Callable:
    """``(table, word) -> [float32x16, ...]``: the weights of each column of a chunk (16
    rows, ``32 // bits`` columns) from its word vector: :func:`vector_lookup` of each
    column's codes, or for byte planes eight ``vpermi2b``, four blends and eight unpacks for
    all four columns (four ``vpermi2b`` and no blend for at most 128 entries)."""
    bits = _bits(table_size, vbmi)
    per = 32 // bits
    mask = T.broadcast(T.int32((1 << bits) - 1), LANES)
    lookup = vector_lookup(table_size)
    if not _planes(table_size, vbmi):
        return lambda table, word: [
            lookup(table, (word >> T.broadcast(s * bits, LANES)) & mask) for s in range(per)
        ]

    def planes(table: Any, word: Any) -> list[Any]:
        code = tirx.reinterpret(f"int8x{BYTES}", word)
        high = code < T.broadcast(T.int8(0), BYTES)  # entries 128-255

        def plane(p: int) -> Any:
            def half(start: int) -> Any:
                return tirx.call_llvm_pure_intrin(
                    f"int8x{BYTES}", "llvm.x86.avx512.vpermi2var.qi.512",
                    table[lanes(start, BYTES)], code, table[lanes(start + BYTES, BYTES)],
                )

            if table_size <= 128:  # codes below 128: no top bit to blend on
                return half(MAX_TABLE * p)
            return tirx.Select(high, half(MAX_TABLE * p + 128), half(MAX_TABLE * p))

        b0, b1, b2, b3 = (plane(p) for p in range(4))
        low01, high01 = _unpack(b0, b1, 1, False), _unpack(b0, b1, 1, True)
        low23, high23 = _unpack(b2, b3, 1, False), _unpack(b2, b3, 1, True)
        pairs = ((low01, low23, False), (low01, low23, True),
                 (high01, high23, False), (high01, high23, True))
        return [
            tirx.reinterpret(f"float32x{LANES}", _unpack(a, b, 2, upper)) for a, b, upper in pairs
        ]

    return planes


def _unpack(a: Any, b: Any, size: int, upper: bool) -> Any:
    """``vpunpck{l,h}{bw,wd}`` of two int8x64 vectors: in each 128-bit lane, the lower (or
    upper) half of the elements of ``size`` bytes of ``a`` and ``b``, interleaved."""
    per = 16 // size  # elements per 128-bit lane
    order = []
    for lane in range(4):
        for i in range(per // 2):
            element = lane * per + i + (per // 2 if upper else 0)
            for source in (0, 1):
                order += [source * BYTES + element * size + byte for byte in range(size)]
    return tirx.Shuffle([a, b], [tirx.IntImm("int32", i) for i in order])


def _pick(weights: list[Any], s: Any) -> Any:
    """``weights[s]`` for an unrolled loop variable ``s`` (folded once the loop is unrolled)."""
    chosen = weights[-1]
    for index in range(len(weights) - 2, -1, -1):
        chosen = tirx.Select(s == index, weights[index], chosen)
    return chosen


def pack_codes(codes: np.ndarray, table_size: int, vbmi: bool = False) -> np.ndarray:
    """``codes`` (rows, columns) of a table of ``table_size`` entries in the kernel's layout:
    int32 words of shape (row groups, column chunks, 16), the bytes of a chunk in the unpacks'
    order when the table is looked up as byte planes."""
    bits = _bits(table_size, vbmi)
    per = 32 // bits
    rows, columns = codes.shape
    groups, chunks = -(-rows // LANES), -(-columns // per)
    padded = np.zeros((groups * LANES, chunks * per), np.uint32)
    padded[:rows, :columns] = codes
    # (groups, lanes, chunks, per) -> (groups, chunks, lanes, per)
    blocks = padded.reshape(groups, LANES, chunks, per).transpose(0, 2, 1, 3)
    if _planes(table_size, vbmi):  # byte 16 (l // 4) + 4 s + l % 4 <- (lane l, column s)
        lane, column = np.arange(LANES)[:, None], np.arange(per)[None]
        order = (16 * (lane // 4) + 4 * column + lane % 4).ravel()
        moved = np.empty((groups, chunks, BYTES), np.uint8)
        moved[..., order] = blocks.reshape(groups, chunks, BYTES)
        return np.ascontiguousarray(moved).view(np.int32)
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    words = np.bitwise_or.reduce(blocks << shifts, axis=-1).astype(np.uint32)
    return np.ascontiguousarray(words.view(np.int32))


@functools.cache  # a compile emits each kernel more than once (choice, then the model)
def table_linear(
    batch: int, in_features: int, out_features: int, table_size: int, vbmi: bool = False,
    relu: bool = False,
) -> Any:
    """The kernel ``y = x @ table[codes].T + bias`` for ``x`` of shape (batch, in), as a
    scheduled PrimFunc taking ``(x, bias, table, words, y)``: ``bias`` has ``out_features``
    entries (zeros when the layer has none), ``table`` is :func:`kernel_table` of the
    codebook, ``words`` :func:`pack_codes` of the codes (both with the same ``vbmi``).
    With ``relu``, ``y`` is the ReLU of that."""
    bits = _bits(table_size, vbmi)
    per = 32 // bits
    full, tail = divmod(in_features, per)
    chunks = full + (1 if tail else 0)
    groups = -(-out_features // LANES)
    tile = next(t for t in (8, 4, 2, 1) if batch % t == 0)
    partials = max(1, 4 // tile)  # independent sums per batch row, so the FMAs overlap
    accumulators = tile * partials
    lookup = _chunk_lookup(table_size, vbmi)
    table_shape = kernel_table(np.zeros(table_size, np.float32), vbmi).shape
    table_dtype = "int8" if _planes(table_size, vbmi) else "float32"
    last = chunks - 1
    n, k, b = out_features, in_features, batch
    # A table in memory is read once per weight: into a scratch column block of the row
    # group, which every batch tile then reads (one vector load instead of 16 lookups).
    once = table_size > MAX_REGISTER_TABLE and b > tile
    tasks, per_task = split_tasks(groups, n * k * b)
    scratch_size = chunks * per * LANES if once else LANES

    def fetch(table: Any, scratch: Any, word: Any, column: Any, s: Any) -> Any:
        if once:
            return scratch[tirx.Ramp(column * LANES, 1, LANES)]
        return _pick(lookup(table, word), s)

    @T.macro
    def multiply_in(acc, x, w, outer, column, s):
        # the looked-up weights of one column times that column of every row of a batch tile
        for t in T.unroll(tile):
            slot = (t * partials + s % partials) * LANES
            acc[T.ramp(slot, 1, LANES)] = acc[T.ramp(slot, 1, LANES)] + (
                T.broadcast(x[outer * tile + t, column], LANES) * w
            )

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((b, k), "float32"),
        bias: T.Buffer((n,), "float32"),
        table: T.Buffer(table_shape, table_dtype),
        words: T.Buffer((groups, chunks, LANES), "int32"),
        y: T.Buffer((b, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((accumulators * LANES,), "float32", scope="local")
            scratch = T.alloc_buffer((scratch_size,), "float32")
            for member in range(per_task):
                g = T.meta_var(task * per_task + member)
                if g < groups:  # the last task may hold fewer
                    for c in range(chunks if once else 0):
                        word = words[g, c, T.ramp(0, 1, LANES)]
                        for s in T.unroll(per):
                            scratch[T.ramp((c * per + s) * LANES, 1, LANES)] = _pick(
                                lookup(table, word), s
                            )
                    for outer in range(b // tile):
                        for a in T.unroll(accumulators):
                            acc[T.ramp(a * LANES, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                        for c in range(full):
                            word = words[g, c, T.ramp(0, 1, LANES)]
                            for s in T.unroll(per):
                                multiply_in(acc, x, fetch(table, scratch, word, c * per + s, s),
                                            outer, c * per + s, s)
                        for s in T.unroll(tail):
                            word = words[g, last, T.ramp(0, 1, LANES)]
                            multiply_in(acc, x, fetch(table, scratch, word, full * per + s, s),
                                        outer, full * per + s, s)
                        for t in T.unroll(tile):
                            for lane in range(LANES):
                                if g * LANES + lane < n:
                                    y[outer * tile + t, g * LANES + lane] = bias[g * LANES + lane]
                                    for p in T.unroll(partials):
                                        y[outer * tile + t, g * LANES + lane] = (
                                            y[outer * tile + t, g * LANES + lane]
                                            + acc[(t * partials + p) * LANES + lane]
                                        )
                                    if relu:
                                        y[outer * tile + t, g * LANES + lane] = T.max(
                                            y[outer * tile + t, g * LANES + lane], T.float32(0)
                                        )

    return kernel


def pack_values(codes: np.ndarray, table_size: int, vbmi: bool = False) -> np.ndarray:
    """A flat array of codes in the layout :func:`table_values` reads: :func:`pack_codes` of
    one group of 16 rows whose column ``j`` holds codes ``16 j`` to ``16 j + 15``, so that
    each column looked up is 16 consecutive values."""
    columns = -(-int(codes.size) // LANES)
    padded = np.zeros(columns * LANES, np.uint32)
    padded[: codes.size] = codes.reshape(-1)
    return pack_codes(padded.reshape(columns, LANES).T, table_size, vbmi).reshape(-1)


def table_values_length(count: int, table_size: int, vbmi: bool = False) -> int:
    """How many values :func:`table_values` writes for ``count`` codes: whole chunks."""
    per = 32 // _bits(table_size, vbmi)
    return -(-count // (per * LANES)) * per * LANES


@functools.cache
def table_values(
    count: int, table_size: int, vbmi: bool = False, given: tuple[int, ...] = (1,)
) -> Any:
    """The kernel that decodes ``count`` codes into a table of ``table_size`` entries to
    float32 values in order, 16 at a time as :func:`table_linear` looks up its weights, as a
    scheduled PrimFunc taking ``(x, table, words, values)``: ``table`` is
    :func:`kernel_table` of the codebook, ``words`` :func:`pack_values` of the codes, and
    ``values`` holds ``count`` rounded up to a whole chunk. ``x`` (of shape ``given``) is read
    once and dropped, so that Relax neither folds the call at compile time nor takes it for a
    reshape (see :func:`autoshrink.compiler.decoded.decoded_values`)."""
    per = 32 // _bits(table_size, vbmi)
    chunks = table_values_length(count, table_size, vbmi) // (per * LANES)
    lookup = _chunk_lookup(table_size, vbmi)
    table_shape = kernel_table(np.zeros(table_size, np.float32), vbmi).shape
    table_dtype = "int8" if _planes(table_size, vbmi) else "float32"
    tasks, per_task = split_tasks(chunks, count * 4)
    origin = (0,) * len(given)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer(given, "float32"),
        table: T.Buffer(table_shape, table_dtype),
        words: T.Buffer((chunks * LANES,), "int32"),
        values: T.Buffer((chunks * per * LANES,), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        T.evaluate(x[origin])
        for task in T.parallel(tasks):
            for member in range(per_task):
                c = T.meta_var(task * per_task + member)
                if c < chunks:
                    word = words[T.ramp(c * LANES, 1, LANES)]
                    for s in T.unroll(per):
                        values[T.ramp((c * per + s) * LANES, 1, LANES)] = _pick(
                            lookup(table, word), s
                        )

    return kernel
