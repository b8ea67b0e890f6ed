"""Blockwise MatMulNBits weights for a graph another tool exported (the optimum flavour).

The fused builder writes its own graph, so it knows every weight; an exported graph is
rewritten instead. Each MatMul or Gemm whose weight is a constant becomes ``MatMulNBits``
with quantize.py's codes and scales (8-bit; or 4-bit with each block's offset added outside
the kernel, as graph.py does), and the token embedding's ``Gather`` on ``input_ids`` becomes
``GatherBlockQuantized`` over 8-bit codes. Those codes and scales are written once into
``weights.bin``: the Gather reads them as [vocab, hidden], a tied LM head as [vocab, blocks,
block] at the same offset, and the manifest's embedding entry points there as well, so the
largest matrix of a small model is stored once, in 8 bits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_packs.build.graph import EmbedLayout
from model_packs.build.quantize import quantize_blockwise, quantize_blockwise_4bit
from model_packs.errors import SourceModelError
from model_packs.optimum_io import INPUT_IDS

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
_ALIGN = 64
_INLINE_BYTES = 1024  # smaller initializers (norm scales, shapes) stay in model.onnx
_MS = "com.microsoft"


@dataclass(frozen=True)
class QuantizeOptions:
    widths: dict[str, int]  # bits by kind of matrix: attention, mlp, lm_head (levels.widths)
    block_size: int = 32
    accuracy_level: int = 4


@dataclass(frozen=True)
class Linear:
    """A MatMul or Gemm by a constant: ``out = x @ W.T (+ bias)`` with W [N, K] = ``matrix``."""

    node: onnx.NodeProto
    x: str
    source: str  # the initializer W comes from
    matrix: np.ndarray
    bias: str | None
    kind: str  # attention | mlp | lm_head


@dataclass
class QuantizeReport:
    embedding: EmbedLayout
    bits: Counter[int] = field(default_factory=Counter)  # matrices rewritten, by width


class _Blob:
    """``weights.bin``, append-only; hands out TensorProtos that point into it."""

    def __init__(self, path: Path) -> None:
        self.fh: BinaryIO = path.open("wb")
        self.location, self.offset = path.name, 0

    def write(self, arr: np.ndarray) -> tuple[int, int]:
        """Append ``arr`` at the next aligned offset; return (offset, length)."""
        pad = (-self.offset) % _ALIGN
        self.fh.write(b"\0" * pad)
        data = np.ascontiguousarray(arr).tobytes()
        self.fh.write(data)
        at = self.offset + pad
        self.offset = at + len(data)
        return at, len(data)

    def tensor(self, name: str, dtype: np.dtype, dims: tuple[int, ...], at: tuple[int, int]) -> TensorProto:
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(at[0])), ("length", str(at[1]))):
            t.external_data.add(key=key, value=value)
        return t

    def add(self, name: str, arr: np.ndarray) -> TensorProto:
        return self.tensor(name, arr.dtype, arr.shape, self.write(arr))

    def close(self) -> None:
        self.fh.flush()
        self.fh.close()


def _kind(node: onnx.NodeProto, source: str, n: int, vocab: int) -> str:
    """Which width applies: the LM head (N is the vocabulary), attention or the MLP (named so
    in the module path the exporter records in node and weight names)."""
    if n == vocab:
        return "lm_head"
    names = f"{node.name} {source}".lower()
    return "attention" if "attn" in names or "attention" in names else "mlp"


def _constant(
    name: str, inits: dict[str, TensorProto], producers: dict[str, onnx.NodeProto]
) -> tuple[str, bool] | None:
    """The 2-D initializer behind ``name`` and whether a Transpose sits between them."""
    if name in inits and len(inits[name].dims) == 2:
        return name, False
    node = producers.get(name)
    if node is None or node.op_type != "Transpose" or node.input[0] not in inits:
        return None
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    if len(inits[node.input[0]].dims) != 2 or perm not in ([], [[1, 0]]):
        return None
    return node.input[0], True


def find_linears(graph: onnx.GraphProto, vocab: int) -> list[Linear]:
    """Every MatMul/Gemm of the graph whose weight is a constant matrix."""
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    found = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul":
            const, bias, trans_b = _constant(node.input[1], inits, producers), None, False
        elif node.op_type == "Gemm" and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0:
            if attrs.get("beta", 1.0) != 1.0:
                continue
            const, trans_b = _constant(node.input[1], inits, producers), bool(attrs.get("transB", 0))
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        else:
            continue
        if const is None:
            continue
        source, transposed = const
        w = numpy_helper.to_array(inits[source]).astype(np.float32)
        matrix = w if transposed != trans_b else w.T  # W [N, K]
        found.append(
            Linear(node, node.input[0], source, matrix, bias, _kind(node, source, matrix.shape[0], vocab))
        )
    return found


_PASS_THROUGH = ("Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten")


def _from_input_ids(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether ``name`` is ``input_ids``, maybe reshaped or cast on the way."""
    for _ in range(4):
        if name == INPUT_IDS:
            return True
        node = producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            return False
        name = node.input[0]
    return name == INPUT_IDS


def find_embedding(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, np.ndarray]:
    """The token embedding: the one Gather of a constant matrix by the token ids."""
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    hits = [
        n
        for n in graph.node
        if n.op_type == "Gather"
        and n.input[0] in inits
        and len(inits[n.input[0]].dims) == 2
        and _from_input_ids(n.input[1], producers)
    ]
    if len(hits) != 1:
        raise SourceModelError(
            f"the exported graph has {len(hits)} embedding Gathers on {INPUT_IDS}, expected 1"
        )
    return hits[0], numpy_helper.to_array(inits[hits[0].input[0]]).astype(np.float32)


class _Rewriter:
    """Builds the quantized graph's new nodes and initializers."""

    def __init__(self, opts: QuantizeOptions, blob: _Blob) -> None:
        self.opts, self.blob = opts, blob
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.shared: dict[str, list[str]] = {}  # source initializer -> its 8-bit [codes, scales]
        self.sums: dict[tuple[str, int], str] = {}

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        domain = _MS if op in ("MatMulNBits", "GatherBlockQuantized") else ""
        name = f"{outputs[0]}/{op}"
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def embedding(self, gather: onnx.NodeProto, table: np.ndarray) -> EmbedLayout:
        """8-bit codes written once, read as [vocab, hidden] here and [vocab, blocks, block]
        by a tied LM head."""
        rows, cols = table.shape
        bs = self.opts.block_size
        if cols % bs:
            raise SourceModelError(f"the embedding width {cols} is not a multiple of the block size {bs}")
        q = quantize_blockwise(table, bs)
        codes_at, scales_at = self.blob.write(q.codes), self.blob.write(q.scales)
        name = gather.input[0]
        self.inits += [
            self.blob.tensor(f"{name}.codes", np.dtype(np.uint8), (rows, cols), codes_at),
            self.blob.tensor(f"{name}.qweight", np.dtype(np.uint8), q.codes.shape, codes_at),
            self.blob.tensor(f"{name}.scales", np.dtype(np.float32), q.scales.shape, scales_at),
        ]
        self.shared[name] = [f"{name}.qweight", f"{name}.scales"]
        self.node(
            "GatherBlockQuantized",
            [f"{name}.codes", gather.input[1], f"{name}.scales"],
            list(gather.output),
            gather_axis=0,
            quantize_axis=1,
            block_size=bs,
            bits=8,
        )
        return EmbedLayout(rows, cols, bs, codes_at[0], scales_at[0])

    def linear(self, lin: Linear, tied: bool) -> int:
        """Emit ``lin`` quantized; returns the width used (4 needs K a multiple of the block)."""
        n, k = lin.matrix.shape
        bits = self.opts.widths.get(lin.kind, 8)
        bits = 8 if k % self.opts.block_size else bits
        out = f"{lin.node.output[0]}.nobias" if lin.bias else lin.node.output[0]
        if bits == 4:
            self._linear4(lin, out)
        else:
            self._nbits(lin.x, self._codes8(lin, tied), out, n, k, 8)
        if lin.bias:
            self.node("Add", [out, lin.bias], [lin.node.output[0]])
        return bits

    def _codes8(self, lin: Linear, tied: bool) -> list[str]:
        if tied and lin.source in self.shared:
            return self.shared[lin.source]
        q = quantize_blockwise(lin.matrix, self.opts.block_size)
        name = f"{lin.node.output[0]}.w8"
        self.inits += [self.blob.add(f"{name}.qweight", q.codes), self.blob.add(f"{name}.scales", q.scales)]
        return [f"{name}.qweight", f"{name}.scales"]

    def _nbits(self, x: str, weights: list[str], out: str, n: int, k: int, bits: int) -> None:
        self.node(
            "MatMulNBits",
            [x, *weights],
            [out],
            K=k,
            N=n,
            bits=bits,
            block_size=self.opts.block_size,
            accuracy_level=self.opts.accuracy_level,
        )

    def _linear4(self, lin: Linear, out: str) -> None:
        """``MatMulNBits(x, codes, scales) + blocksums(x) @ offsets.T`` (quantize.py's form)."""
        n, k = lin.matrix.shape
        q = quantize_blockwise_4bit(lin.matrix, self.opts.block_size)
        name = f"{lin.node.output[0]}.w4"
        self.inits += [self.blob.add(f"{name}.qweight", q.codes), self.blob.add(f"{name}.scales", q.scales)]
        self._nbits(lin.x, [f"{name}.qweight", f"{name}.scales"], f"{name}.codes_out", n, k, 4)
        self.inits.append(self.blob.add(f"{name}.offsets", q.offsets.T.copy()))
        self.node("MatMul", [self._block_sums(lin.x, k), f"{name}.offsets"], [f"{name}.offsets_out"])
        self.node("Add", [f"{name}.codes_out", f"{name}.offsets_out"], [out])

    def _block_sums(self, x: str, k: int) -> str:
        """``x`` summed over each block of K, as a MatMul by a 0/1 matrix [K, K/block] (works
        for inputs of any rank; once per input: the matrices that read one input share it)."""
        if (x, k) in self.sums:
            return self.sums[(x, k)]
        bs = self.opts.block_size
        ones = f"block_sums.{k}"
        if not any(t.name == ones for t in self.inits):
            indicator = (np.arange(k)[:, None] // bs == np.arange(k // bs)[None, :]).astype(np.float32)
            self.inits.append(self.blob.add(ones, indicator))
        out = f"{x}.block_sums"
        self.node("MatMul", [x, ones], [out])
        self.sums[(x, k)] = out
        return out


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (the Transposes of weights now quantized),
    then initializers nobody reads."""
    wanted = {o.name for o in graph.output}
    while True:
        used = wanted | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def quantize_graph(float_model: Path, out_dir: Path, opts: QuantizeOptions) -> QuantizeReport:
    """Write ``out_dir/model.onnx`` and ``weights.bin``: the float export with blockwise weights."""
    model = onnx.load(str(float_model))
    graph = model.graph
    gather, table = find_embedding(graph)
    # a constant narrower than a block (a rotary frequency row, say) is no weight matrix: kept float
    linears = [w for w in find_linears(graph, vocab=table.shape[0]) if min(w.matrix.shape) >= opts.block_size]
    if not linears:
        raise SourceModelError("the exported graph has no MatMul or Gemm by a constant weight to quantize")
    blob = _Blob(out_dir / WEIGHTS_FILE)
    try:
        rw = _Rewriter(opts, blob)
        report = QuantizeReport(rw.embedding(gather, table))
        for lin in linears:
            report.bits[rw.linear(lin, tied=lin.source == gather.input[0] and lin.kind == "lm_head")] += 1
        _splice(graph, {id(lin.node) for lin in linears} | {id(gather)}, rw)
        _externalize(graph, blob)
    finally:
        blob.close()
    if not any(o.domain == _MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    onnx.save_model(model, str(out_dir / MODEL_FILE))
    return report


def _splice(graph: onnx.GraphProto, replaced: set[int], rw: _Rewriter) -> None:
    """Swap the replaced nodes for the new ones, prune, and keep the list topologically sorted."""
    nodes = [n for n in graph.node if id(n) not in replaced] + rw.nodes
    graph.initializer.extend(rw.inits)
    del graph.node[:]
    graph.node.extend(_topological(nodes, graph))
    _prune(graph)


def _topological(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Order ``nodes`` so each comes after the producers of its inputs (stable otherwise)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        left = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                left.append(n)
        if len(left) == len(pending):
            raise SourceModelError(f"the rewritten graph has a cycle or a missing input at {left[0].name}")
        pending = left
    return ordered


def _externalize(graph: onnx.GraphProto, blob: _Blob) -> None:
    """Move the float initializers left (biases, norms, positions) into ``weights.bin`` too."""
    for t in graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or len(t.raw_data) <= _INLINE_BYTES:
            continue
        arr = numpy_helper.to_array(t)
        t.CopyFrom(blob.add(t.name, arr))
