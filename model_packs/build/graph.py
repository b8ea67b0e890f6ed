"""Write a Llama/Qwen or Gemma 3 decoder as one fused onnxruntime graph.

The graph is what onnxruntime's fast CPU kernels want, about 13 nodes per layer:
``SkipSimplifiedLayerNormalization``, one packed-QKV ``MatMulNBits`` (8-bit, block 32,
``accuracy_level=4`` for int8 compute; or 4-bit with per-block float offsets, see
quantize.py), ``GroupQueryAttention`` with rotary embedding and
a KV buffer shared by past and present, and a SiLU MLP. The float reference is the same
graph with plain ``MatMul``, so the evaluation compares quantization and nothing else.

Gemma 3 (what :class:`ModelConfig`'s extra fields switch on) adds: token rows scaled by
sqrt(hidden) in the graph, RMSNorm of each q and k head before the attention (the packed
QKV output is split, each part normed per head), a norm on the attention and MLP outputs
before each residual add, a GELU (tanh) gate, and local layers whose attention sees a
sliding window and whose rotary tables (``cos_cache_local``) have their own base.

Inputs: ``inputs_embeds`` (the engine looks token rows up in the int8 table itself, so
the tied embedding is stored once), ``logits_index`` (positions whose logits are
wanted: the last one when decoding, all of them when evaluating), ``seqlens_k`` and
``total_sequence_length`` (GroupQueryAttention's view of the cache), and per layer
``past_key_values.{i}.key/value`` of shape [batch, kv_heads, buffer, head_dim].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_packs.build.quantize import (
    ZERO_POINT,
    Block4Quantized,
    BlockQuantized,
    quantize_blockwise,
    quantize_blockwise_4bit,
)
from model_packs.build.source import ModelConfig, SourceModel
from model_packs.errors import SourceModelError

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
EMBED_FILE = "embed.bin"
_ALIGN = 64


@dataclass(frozen=True)
class GraphOptions:
    quantized: bool
    block_size: int = 32
    accuracy_level: int = 4
    bits: int = 8  # 8, or 4: every linear layer and the LM head (the embedding table stays 8-bit)
    # the MLP's gate, up and down at another width (the "mixed" level: 4-bit MLP, 8-bit
    # attention, LM head and embedding); None: ``bits``
    mlp_bits: int | None = None
    head_bits: int | None = None  # the LM head's width (8: the embedding table's bytes); None: ``bits``


@dataclass(frozen=True)
class EmbedLayout:
    rows: int
    cols: int
    block_size: int
    codes_offset: int
    scales_offset: int
    zero_point: int = ZERO_POINT


class _Blob:
    """Append-only external-data file; returns TensorProtos that point into it."""

    def __init__(self, path: Path) -> None:
        self.location = path.name
        self.fh: BinaryIO = path.open("wb")
        self.offset = 0

    def add(self, name: str, arr: np.ndarray) -> TensorProto:
        pad = (-self.offset) % _ALIGN
        self.fh.write(b"\0" * pad)
        self.offset += pad
        data = np.ascontiguousarray(arr).tobytes()
        self.fh.write(data)
        t = _external_tensor(name, arr, self.location, self.offset, len(data))
        self.offset += len(data)
        return t

    def close(self) -> None:
        self.fh.flush()
        self.fh.close()


def _external_tensor(name: str, arr: np.ndarray, location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
    t.dims.extend(arr.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


class _GraphBuilder:
    """Accumulates nodes and initializers; ``linear`` is the one place weights differ."""

    def __init__(self, cfg: ModelConfig, opts: GraphOptions, blob: _Blob) -> None:
        self.cfg, self.opts, self.blob = cfg, opts, blob
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._sums: set[str] = set()  # block sums already computed, by input tensor

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any) -> None:
        name = f"{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self.blob.add(name, arr))
        return name

    def const(self, name: str, arr: np.ndarray) -> str:
        """A small initializer stored in the graph itself (shape inference reads it)."""
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def linear(self, x: str, w: np.ndarray, name: str, out: str, bits: int | None = None) -> None:
        """y = x @ w.T, with w [N, K] float (reference) or blockwise int8/int4 (pack);
        ``bits`` overrides the graph's width for this matrix."""
        if not self.opts.quantized:
            self.node("MatMul", [x, self.init(f"{name}.weight", w.T.copy())], [out])
            return
        if (bits or self.opts.bits) == 4:
            self.linear_q4(x, quantize_blockwise_4bit(w, self.opts.block_size), name, out)
            return
        self.linear_q(x, quantize_blockwise(w, self.opts.block_size), name, out)

    def linear_q4(self, x: str, q: Block4Quantized, name: str, out: str) -> None:
        """``MatMulNBits(x, codes, scales) + blocksum(x) @ offsets.T``: the 4-bit kernel, then
        each block's offset times the sum of the inputs it applies to (a K/32-wide MatMul)."""
        n, k = q.shape
        bs = self.opts.block_size
        self.node(
            "MatMulNBits",
            [x, self.init(f"{name}.qweight", q.codes), self.init(f"{name}.scales", q.scales)],
            [f"{out}_codes"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=bs,
            accuracy_level=self.opts.accuracy_level,
        )
        sums = self._block_sums(x, k)
        self.node("MatMul", [sums, self.init(f"{name}.offsets", q.offsets.T.copy())], [f"{out}_offsets"])
        self.node("Add", [f"{out}_codes", f"{out}_offsets"], [out])

    def _block_sums(self, x: str, k: int) -> str:
        """Sums of ``x`` over each block of K: [batch, seq, K/block] (once per input tensor:
        gate and up share theirs)."""
        out, bs = f"{x}.block_sums", self.opts.block_size
        if out in self._sums:
            return out
        shape = self.const(f"{x}.block_shape", np.array([0, 0, k // bs, bs], dtype=np.int64))
        self.node("Reshape", [x, shape], [f"{x}.blocks"])
        axes = self.const(f"{x}.block_axes", np.array([-1], dtype=np.int64))
        self.node("ReduceSum", [f"{x}.blocks", axes], [out], keepdims=0)
        self._sums.add(out)
        return out

    def linear_q(
        self, x: str, q: BlockQuantized, name: str, out: str, shared: list[str] | None = None
    ) -> None:
        n, k = q.shape[0], q.shape[1]
        inputs = shared or [self.init(f"{name}.qweight", q.codes), self.init(f"{name}.scales", q.scales)]
        self.node(
            "MatMulNBits",
            [x, *inputs],
            [out],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=8,
            block_size=self.opts.block_size,
            accuracy_level=self.opts.accuracy_level,
        )


def _rotary_caches(cfg: ModelConfig, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    freqs = np.outer(np.arange(cfg.max_context, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _layer(
    g: _GraphBuilder, w: dict[str, np.ndarray], i: int, x: str, residual: str | None
) -> tuple[str, str]:
    """Emit one decoder layer; returns (mlp output, residual stream) for the next one."""
    cfg, p = g.cfg, f"layers.{i}"
    ln, res_a = f"{p}.ln1", f"{p}.res_attn"
    if residual is None:
        norm = g.init(f"{p}.attn_norm", w[f"{p}.attn_norm"])
        g.node("SimplifiedLayerNormalization", [x, norm], [ln], axis=-1, epsilon=cfg.rms_eps)
        res_a = x
    else:
        norm = g.init(f"{p}.attn_norm", w[f"{p}.attn_norm"])
        g.node(
            "SkipSimplifiedLayerNormalization",
            [x, residual, norm],
            [ln, "", "", res_a],
            domain="com.microsoft",
            epsilon=cfg.rms_eps,
        )
    g.linear(_attention(g, w, i, ln), w[f"{p}.o"], f"{p}.o", f"{p}.o_out")
    ln2, res_m = f"{p}.ln2", f"{p}.res_mlp"
    g.node(
        "SkipSimplifiedLayerNormalization",
        [
            _post_norm(g, w, f"{p}.o_out", f"{p}.post_attn_norm"),
            res_a,
            g.init(f"{p}.mlp_norm", w[f"{p}.mlp_norm"]),
        ],
        [ln2, "", "", res_m],
        domain="com.microsoft",
        epsilon=cfg.rms_eps,
    )
    return _post_norm(g, w, _mlp(g, w, p, ln2), f"{p}.post_mlp_norm"), res_m


def _attention(g: _GraphBuilder, w: dict[str, np.ndarray], i: int, ln: str) -> str:
    """Packed QKV projection and GroupQueryAttention (rotary inside); returns its output."""
    cfg, p = g.cfg, f"layers.{i}"
    qkv_w = np.concatenate([w[f"{p}.q"], w[f"{p}.k"], w[f"{p}.v"]], axis=0)
    qkv = f"{p}.qkv"
    g.linear(ln, qkv_w, f"{p}.qkv", qkv)
    if cfg.attention_bias:
        bias = np.concatenate([w[f"{p}.q_bias"], w[f"{p}.k_bias"], w[f"{p}.v_bias"]])
        g.node("Add", [qkv, g.init(f"{p}.qkv_bias", bias)], [f"{qkv}_b"])
        qkv = f"{qkv}_b"
    qkv_inputs = _normed_qkv(g, w, p, qkv) if cfg.qk_norm else [qkv, "", ""]
    local = not cfg.is_global(i)
    rotary = (
        ["cos_cache_local", "sin_cache_local"]
        if local and cfg.rope_local_theta
        else ["cos_cache", "sin_cache"]
    )
    g.node(
        "GroupQueryAttention",
        [
            *qkv_inputs,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            "seqlens_k",
            "total_sequence_length",
            *rotary,
        ],
        [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft",
        num_heads=cfg.num_heads,
        kv_num_heads=cfg.num_kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
        scale=cfg.query_scale or float(1.0 / np.sqrt(cfg.head_dim)),
        # both count the current token: checked against transformers (tests/test_gemma.py)
        local_window_size=cfg.sliding_window if local else -1,
    )
    return f"{p}.attn"


def _normed_qkv(g: _GraphBuilder, w: dict[str, np.ndarray], p: str, qkv: str) -> list[str]:
    """Split the packed projection and RMSNorm each q and k head (Gemma 3): [q, k, v]."""
    cfg = g.cfg
    sizes = [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
    split = g.const(f"{p}.qkv_sizes", np.array(sizes, dtype=np.int64))
    g.node("Split", [qkv, split], [f"{p}.q_raw", f"{p}.k_raw", f"{p}.v_raw"], axis=-1)
    out: list[str] = []
    for kind, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
        by_head = g.const(f"{p}.{kind}_by_head", np.array([0, 0, heads, cfg.head_dim], dtype=np.int64))
        flat = g.const(f"{p}.{kind}_flat", np.array([0, 0, heads * cfg.head_dim], dtype=np.int64))
        g.node("Reshape", [f"{p}.{kind}_raw", by_head], [f"{p}.{kind}_heads"])
        norm = g.init(f"{p}.{kind}_norm", w[f"{p}.{kind}_norm"])
        g.node(
            "SimplifiedLayerNormalization",
            [f"{p}.{kind}_heads", norm],
            [f"{p}.{kind}_normed"],
            axis=-1,
            epsilon=cfg.rms_eps,
        )
        g.node("Reshape", [f"{p}.{kind}_normed", flat], [f"{p}.{kind}_n"])
        out.append(f"{p}.{kind}_n")
    return [*out, f"{p}.v_raw"]


def _post_norm(g: _GraphBuilder, w: dict[str, np.ndarray], x: str, name: str) -> str:
    """Gemma's RMSNorm of a sublayer's output before the residual add; else ``x`` itself."""
    if not g.cfg.post_norms:
        return x
    g.node(
        "SimplifiedLayerNormalization",
        [x, g.init(name, w[name])],
        [f"{name}_out"],
        axis=-1,
        epsilon=g.cfg.rms_eps,
    )
    return f"{name}_out"


def _mlp(g: _GraphBuilder, w: dict[str, np.ndarray], p: str, x: str) -> str:
    """Gated MLP: act(gate(x)) * up(x), then down; SiLU (Llama) or GELU-tanh (Gemma)."""
    mlp_bits = g.opts.mlp_bits
    g.linear(x, w[f"{p}.gate"], f"{p}.gate", f"{p}.gate_out", mlp_bits)
    g.linear(x, w[f"{p}.up"], f"{p}.up", f"{p}.up_out", mlp_bits)
    if g.cfg.activation == "gelu_tanh":
        g.node("FastGelu", [f"{p}.gate_out"], [f"{p}.gelu"], domain="com.microsoft")
        g.node("Mul", [f"{p}.gelu", f"{p}.up_out"], [f"{p}.act"])
    elif g.cfg.activation == "silu":
        g.node("Sigmoid", [f"{p}.gate_out"], [f"{p}.gate_sig"])
        g.node("Mul", [f"{p}.gate_out", f"{p}.gate_sig"], [f"{p}.silu"])
        g.node("Mul", [f"{p}.silu", f"{p}.up_out"], [f"{p}.act"])
    else:
        raise SourceModelError(f"activation {g.cfg.activation!r} is not supported (silu, gelu_tanh)")
    g.linear(f"{p}.act", w[f"{p}.down"], f"{p}.down", f"{p}.mlp_out", mlp_bits)
    return f"{p}.mlp_out"


def _io(cfg: ModelConfig) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    f32 = TensorProto.FLOAT
    kv: list[str | int | None] = ["batch", cfg.num_kv_heads, "kv_len", cfg.head_dim]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", cfg.hidden_size]),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["n_logits"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "n_logits", cfg.vocab_size])]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, kv))
    return inputs, outputs


def _write_embedding(path: Path, q: BlockQuantized) -> tuple[EmbedLayout, list[TensorProto]]:
    """embed.bin: codes then scales; the LM head's initializers point at the same bytes."""
    blob = _Blob(path)
    codes = blob.add("embed.qweight", q.codes)
    scales = blob.add("embed.scales", q.scales)
    blob.close()
    n, k = q.shape
    layout = EmbedLayout(
        rows=n,
        cols=k,
        block_size=q.codes.shape[2],
        codes_offset=int(codes.external_data[1].value),
        scales_offset=int(scales.external_data[1].value),
    )
    return layout, [codes, scales]


def write_graph(
    src: SourceModel, out_dir: Path, opts: GraphOptions, progress: Callable[[int, int], None] | None = None
) -> EmbedLayout:
    """Write model.onnx, weights.bin and embed.bin into ``out_dir``."""
    cfg, w = src.config, src.weights
    embed_q = quantize_blockwise(w["embed"], opts.block_size)
    layout, embed_inits = _write_embedding(out_dir / EMBED_FILE, embed_q)
    blob = _Blob(out_dir / WEIGHTS_FILE)
    g = _GraphBuilder(cfg, opts, blob)
    _rotary_inits(g)
    x, residual = _scaled_embeds(g), None
    for i in range(cfg.num_layers):
        x, residual = _layer(g, w, i, x, residual)
        if progress:
            progress(i + 1, cfg.num_layers + 1)
    if residual is None:
        raise SourceModelError("the model has no decoder layers")
    g.node(
        "SkipSimplifiedLayerNormalization",
        [x, residual, g.init("norm", w["norm"])],
        ["final_ln"],
        domain="com.microsoft",
        epsilon=cfg.rms_eps,
    )
    g.node("Gather", ["final_ln", "logits_index"], ["selected"], axis=1)
    _lm_head(g, w, embed_inits, embed_q)
    blob.close()
    inputs, outputs = _io(cfg)
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        producer_name="edge-slm-agent",
    )
    model.ir_version = 10
    onnx.save(model, str(out_dir / MODEL_FILE))
    if progress:
        progress(cfg.num_layers + 1, cfg.num_layers + 1)
    return layout


def _rotary_inits(g: _GraphBuilder) -> None:
    """cos/sin tables at the model's base, and at the local base if local layers have one."""
    cfg = g.cfg
    cos, sin = _rotary_caches(cfg, cfg.rope_theta)
    g.init("cos_cache", cos)
    g.init("sin_cache", sin)
    if cfg.rope_local_theta and not all(cfg.is_global(i) for i in range(cfg.num_layers)):
        cos, sin = _rotary_caches(cfg, cfg.rope_local_theta)
        g.init("cos_cache_local", cos)
        g.init("sin_cache_local", sin)


def _scaled_embeds(g: _GraphBuilder) -> str:
    """The token rows times the model's embedding scale (Gemma: sqrt(hidden)); the engine
    feeds plain rows of the table the LM head shares."""
    if g.cfg.embed_scale == 1.0:
        return "inputs_embeds"
    scale = g.const("embed_scale", np.array(g.cfg.embed_scale, dtype=np.float32))
    g.node("Mul", ["inputs_embeds", scale], ["embeds_scaled"])
    return "embeds_scaled"


def _lm_head(
    g: _GraphBuilder, w: dict[str, np.ndarray], embed_inits: list[TensorProto], embed_q: BlockQuantized
) -> None:
    head = w.get("lm_head")
    head_bits = g.opts.head_bits or g.opts.bits
    if head is None and g.opts.quantized and head_bits == 8:
        g.inits.extend(embed_inits)
        g.linear_q("selected", embed_q, "lm_head", "logits", shared=[t.name for t in embed_inits])
        return
    g.linear("selected", w["embed"] if head is None else head, "lm_head", "logits", head_bits)
