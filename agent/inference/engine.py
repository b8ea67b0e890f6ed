"""The inference engine: one onnxruntime session, a KV cache that is never copied.

Each layer's key and value live in one preallocated buffer of ``context_length`` rows
that is bound (IO binding) as both ``past`` and ``present``: GroupQueryAttention writes
the new rows in place, so a decode step moves only the new token's embedding in and one
row of logits out. The embedding row is looked up from the pack's int8 table here, one
row per token, because that table is the LM head's weights too.

Because the rows stay in place, the engine remembers which tokens they hold: a prompt that
starts like the previous one (the system prompt, an unchanged sensor preamble) is computed
from the first token that differs. GroupQueryAttention continues a cache with several new
tokens as it computes them in one pass (the same logits to float rounding: identical on the
default pack, within 1e-7 of a mean log-probability on the tiny test model, where the one-row
and many-row kernels round apart), so the prompt is also fed in chunks, which bounds the
activations a long prompt needs.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from agent.errors import BadRequest, TooLarge
from agent.inference.heap import fix_mmap_threshold, release_free_heap
from agent.inference.hf_graph import OptimumGraph
from agent.inference.pack import LoadedPack
from agent.inference.prompts import ChatTemplate, chat_messages
from agent.inference.sampling import Sampler, SamplingParams
from agent.inference.tokenizer import StopMatcher, StreamDecoder, TextTokenizer
from model_packs.format import GRAPH_OPTIMUM


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always produce max_tokens tokens
    deadline: float | None = None  # time.monotonic() after which the loop stops ("deadline")
    # sees the logits each forward pass produced for the next token (tests, health checks)
    observe_logits: Callable[[np.ndarray], None] | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    total_s: float
    # mean natural-log probability, under the model's raw distribution (before temperature,
    # top-k/p and repetition penalty), of each sampled token, a final EOS included; None when
    # nothing was sampled. A confidence signal: 0 is certain, lower is less sure.
    mean_logprob: float | None = None
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values the previous run left


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length" | "cancelled" | "deadline"
    usage: Usage


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# Prompt tokens per forward pass. Measured (bench/engine.py --prefill-chunks): a 1,500-token
# prompt's activations grow with the chunk; see PREFILL_CHUNK's note in the README.
PREFILL_CHUNK = 256


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Serves one generation at a time (a lock guards the shared KV buffers)."""

    def __init__(
        self,
        pack: LoadedPack,
        threads: int | None = None,
        context_length: int | None = None,
        *,
        prefix_cache: bool = True,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        m = pack.manifest
        self.pack = pack
        self.arch = m.architecture
        self.context_length = context_length or m.generation.context_length
        if not 1 < self.context_length <= self.arch.max_context:
            raise BadRequest(
                f"context_length must be within 2..{self.arch.max_context}, got {self.context_length}"
            )
        self.threads = threads or default_threads()
        fix_mmap_threshold()  # before the first large buffer (agent/inference/heap.py)
        self.tokenizer = TextTokenizer(pack.tokenizer_json)
        release_free_heap()  # parsing Gemma 3's tokenizer.json peaks at 346 MB and keeps 100
        self.template = ChatTemplate(pack.chat_template)
        self.eos_ids = frozenset(m.tokenizer.eos_token_ids)
        self._lock = threading.Lock()
        self.prefix_cache = prefix_cache  # False: every prompt from its first token (benchmarks)
        self.prefill_chunk = max(1, prefill_chunk)
        self._cached: list[int] = []  # the tokens whose keys and values rows 0.. of the buffers hold
        # an optimum export keeps its own past (hf_graph.py); the fused graph's buffers are bound here
        self._optimum: OptimumGraph | None = None
        if m.graph == GRAPH_OPTIMUM:
            self._optimum = OptimumGraph(pack.model_path, self.threads, list(m.runtime.execution_providers))
            return
        self._session = self._open_session()
        self._binding = self._session.io_binding()
        self._bind_kv_cache()
        self._logits_one = np.zeros((1, 1, self.arch.vocab_size), dtype=np.float32)
        self._logits_one_ort = ort.OrtValue.ortvalue_from_numpy(self._logits_one)
        release_free_heap()

    def _open_session(self) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        return ort.InferenceSession(
            str(self.pack.model_path), opts, providers=list(self.pack.manifest.runtime.execution_providers)
        )

    def _bind_kv_cache(self) -> None:
        shape = (1, self.arch.num_kv_heads, self.context_length, self.arch.head_dim)
        self._kv: list[np.ndarray] = []
        for i in range(self.arch.num_layers):
            for kind in ("key", "value"):
                buf = np.zeros(shape, dtype=np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                self._binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                self._binding.bind_ortvalue_output(f"present.{i}.{kind}", value)
                self._kv.append(buf)

    # ------------------------------------------------------------ forward passes

    def embed(self, ids: list[int]) -> np.ndarray:
        """Dequantize the embedding rows of ``ids`` from the int8 table: [len(ids), hidden]."""
        return self.pack.embedding.rows(ids)

    def _forward(self, ids: list[int], start: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Run ``ids`` at positions start.. against the cache; return logits [len(rows), vocab]
        for the chosen rows of ``ids`` (default: the last one, what decoding needs)."""
        if self._optimum is None:
            return self._forward_fused(ids, start, rows)
        del self._cached[start:]
        logits = self._optimum.forward(ids, start, rows)
        self._cached.extend(ids)
        return logits

    def _forward_fused(self, ids: list[int], start: int, rows: np.ndarray | None) -> np.ndarray:
        total = start + len(ids)
        b = self._binding
        b.bind_cpu_input("inputs_embeds", self.embed(ids)[None])
        positions = np.array([len(ids) - 1], np.int64) if rows is None else rows.astype(np.int64)
        b.bind_cpu_input("logits_index", positions)
        b.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        if rows is None:
            out = self._logits_one
            b.bind_ortvalue_output("logits", self._logits_one_ort)
        else:
            out = np.empty((1, len(positions), self.arch.vocab_size), dtype=np.float32)
            b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))
        del self._cached[start:]  # rows from ``start`` on are rewritten (or garbage if this fails)
        self._session.run_with_iobinding(b)
        self._cached.extend(ids)
        return np.asarray(out[0])

    def _prefill(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        """Logits after ``prompt`` and how many of its tokens the cache already held: the
        rows of the longest common prefix with what the buffers hold are kept (at least the
        last token is computed, for its logits), the rest goes in chunks."""
        reuse = min(common_prefix(self._cached, prompt), len(prompt) - 1) if self.prefix_cache else 0
        pos, logits = reuse, None
        while pos < len(prompt):
            chunk = prompt[pos : pos + self.prefill_chunk]
            logits = self._forward(chunk, pos)
            pos += len(chunk)
        if logits is None:
            raise BadRequest("the prompt is empty")
        return logits, reuse

    def logits_for(self, ids: list[int], rows: list[int] | None = None) -> np.ndarray:
        """Teacher-forced logits at ``rows`` of ``ids`` (default: every position): the LM
        head runs only for the rows asked, so a health check pays for the answer only."""
        if not 0 < len(ids) <= self.context_length:
            raise TooLarge(
                f"{len(ids)} tokens do not fit the context of {self.context_length}",
                limit=self.context_length,
            )
        wanted = np.arange(len(ids)) if rows is None else np.asarray(rows)
        with self._lock:
            return self._forward(ids, 0, wanted).copy()

    # ------------------------------------------------------------ generation

    def prompt_ids(
        self, question: str, system_prompt: str | None = None, answer_start: str = ""
    ) -> list[int]:
        """The chat prompt's token ids. ``answer_start``: text the assistant's turn begins with
        (after the template's generation prompt), which the model then continues; it is
        tokenized as content, so it cannot carry special tokens."""
        system = self.pack.manifest.generation.system_prompt if system_prompt is None else system_prompt
        parts = self.template.render_parts(chat_messages(question, system))
        if not answer_start:
            return self.tokenizer.encode_parts(parts)
        # a completion prompt ends "Answer:" (Gemma's template); a chat turn ends in a newline
        rendered = "".join(text for text, _ in parts)
        if rendered and not rendered[-1].isspace() and not answer_start[0].isspace():
            answer_start = " " + answer_start
        return self.tokenizer.encode_parts([*parts, (answer_start, True)])

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Limits are errors, never silent clamps: name the limit that was hit."""
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {max_tokens}")
        if prompt_tokens >= self.context_length:
            raise TooLarge(
                f"prompt is {prompt_tokens} tokens; the context holds {self.context_length}",
                limit=self.context_length,
            )
        if prompt_tokens + max_tokens > self.context_length:
            raise TooLarge(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                f"{self.context_length}; at most {self.context_length - prompt_tokens} new tokens fit",
                limit=self.context_length,
            )

    def generate(
        self,
        req: GenerationRequest,
        on_delta: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Generate, streaming whole-character deltas to ``on_delta``; ``cancel`` may be
        set from any thread and stops the loop before the next decode step."""
        self.check_fits(len(req.prompt_ids), req.max_tokens)
        with self._lock:
            return _Run(self, req, on_delta, cancel).execute()


class _Run:
    """One generation's loop state, kept apart from the engine's shared buffers."""

    def __init__(
        self,
        engine: Engine,
        req: GenerationRequest,
        on_delta: Callable[[str], None] | None,
        cancel: threading.Event | None,
    ) -> None:
        self.engine, self.req, self.on_delta, self.cancel = engine, req, on_delta, cancel
        self.sampler = Sampler(req.sampling)
        self.decoder = StreamDecoder(engine.tokenizer)
        self.stops = StopMatcher(list(req.stop))
        self.pieces: list[str] = []
        self.generated: list[int] = []
        self.logprob_sum, self.sampled = 0.0, 0
        self.cached = 0  # prompt tokens the engine's cache already held

    def _pick(self, logits: np.ndarray) -> int:
        """Sample the next token and add its log-softmax under the raw logits to the sum."""
        token = self.sampler.pick(logits)
        top = float(logits.max())
        self.logprob_sum += float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))
        self.sampled += 1
        return token

    def _emit(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            if self.on_delta:
                self.on_delta(text)

    def _step(self, token: int) -> str | None:
        """Account for one sampled token; return a finish reason or None to go on."""
        if token in self.engine.eos_ids and not self.req.ignore_eos:
            return "eos"
        self.generated.append(token)
        self._emit(self.stops.feed(self.decoder.push(token)))
        if self.stops.stopped:
            return "stop"
        if len(self.generated) >= self.req.max_tokens:
            return "length"
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.req.deadline is not None and time.monotonic() > self.req.deadline:
            return "deadline"
        return None

    def _observed(self, logits: np.ndarray) -> np.ndarray:
        if self.req.observe_logits is not None:
            self.req.observe_logits(logits[-1])
        return logits

    def execute(self) -> Completion:
        prompt = self.req.prompt_ids
        t0 = time.perf_counter()
        if self.cancel is not None and self.cancel.is_set():
            return self._finish("cancelled", t0, t0)
        logits, self.cached = self.engine._prefill(prompt)
        self._observed(logits)
        self.sampler.remember(prompt)
        token = self._pick(logits[-1])
        t_first = time.perf_counter()
        reason = self._step(token)
        while reason is None:
            logits = self._observed(self.engine._forward([token], len(prompt) + len(self.generated) - 1))
            token = self._pick(logits[-1])
            reason = self._step(token)
        if reason != "stop":
            self._emit(self.stops.feed(self.decoder.flush()))
            self._emit(self.stops.flush())
        return self._finish(reason, t0, t_first)

    def _finish(self, reason: str, t0: float, t_first: float) -> Completion:
        end = time.perf_counter()
        n = len(self.generated)
        decode_s = end - t_first
        usage = Usage(
            prompt_tokens=len(self.req.prompt_ids),
            completion_tokens=n,
            time_to_first_token_s=t_first - t0,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=end - t0,
            mean_logprob=self.logprob_sum / self.sampled if self.sampled else None,
            cached_prompt_tokens=self.cached,
        )
        return Completion("".join(self.pieces), list(self.generated), reason, usage)
