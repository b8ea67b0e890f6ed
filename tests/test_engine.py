"""The engine on the tiny pack: cache correctness, sampling, stops, streaming, cancel, limits."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.errors import BadRequest, TooLarge
from agent.inference import Engine, GenerationRequest, LoadedPack
from agent.inference.sampling import SamplingParams


def _prompt(engine: Engine, text: str = "What is the temperature?") -> list[int]:
    return engine.prompt_ids(text, "You answer about the greenhouse.")


def test_incremental_decoding_matches_full_recompute(tiny_engine: Engine) -> None:
    prompt = _prompt(tiny_engine)
    seen: list[np.ndarray] = []
    done = tiny_engine.generate(GenerationRequest(prompt, 20, observe_logits=lambda x: seen.append(x.copy())))
    assert done.finish_reason in ("length", "eos") and len(done.token_ids) >= 1
    full = tiny_engine.logits_for(prompt + done.token_ids)
    # one forward per sampled token (an EOS is sampled but not kept)
    assert len(seen) == len(done.token_ids) + (done.finish_reason == "eos")
    for step, logits in enumerate(seen):
        want = full[len(prompt) - 1 + step]
        # int8 activations (accuracy_level=4) can round one block differently between the
        # one-row and many-row kernels: close, not bit-equal
        np.testing.assert_allclose(logits, want, atol=1e-2 * np.abs(want).max(), rtol=0)
        if step < len(done.token_ids):
            assert int(want.argmax()) == done.token_ids[step]


def test_second_generation_does_not_see_the_first(tiny_engine: Engine) -> None:
    a = tiny_engine.generate(GenerationRequest(_prompt(tiny_engine, "humidity?"), 12))
    tiny_engine.generate(GenerationRequest(_prompt(tiny_engine, "a much longer question about soil"), 30))
    b = tiny_engine.generate(GenerationRequest(_prompt(tiny_engine, "humidity?"), 12))
    assert a.token_ids == b.token_ids


def test_same_seed_same_output_other_seed_differs(tiny_engine: Engine) -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        return tiny_engine.generate(GenerationRequest(_prompt(tiny_engine), 24, params)).token_ids

    assert run(7) == run(7)
    assert any(run(7) != run(s) for s in (8, 9, 10))


def test_top_k_one_is_greedy(tiny_engine: Engine) -> None:
    prompt = _prompt(tiny_engine)
    greedy = tiny_engine.generate(GenerationRequest(prompt, 16)).token_ids
    top1 = tiny_engine.generate(
        GenerationRequest(prompt, 16, SamplingParams(temperature=1.5, top_k=1, seed=3))
    )
    assert top1.token_ids == greedy


def test_repetition_penalty_changes_greedy_output(tiny_engine: Engine) -> None:
    prompt = _prompt(tiny_engine)
    plain = tiny_engine.generate(GenerationRequest(prompt, 24)).token_ids
    penal = tiny_engine.generate(
        GenerationRequest(prompt, 24, SamplingParams(repetition_penalty=3.0))
    ).token_ids
    assert plain != penal


def test_stop_string_truncates_across_token_boundaries(tiny_engine: Engine) -> None:
    prompt = _prompt(tiny_engine)
    free = tiny_engine.generate(GenerationRequest(prompt, 24, SamplingParams(temperature=1.0, seed=11)))
    text = free.text
    assert len(text) >= 6
    stop = text[3:6]  # a 3-character stop in the middle, usually spanning two tokens
    stopped = tiny_engine.generate(
        GenerationRequest(prompt, 24, SamplingParams(temperature=1.0, seed=11), (stop,))
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.find(stop)]


def test_streamed_deltas_join_to_the_final_text(tiny_engine: Engine) -> None:
    deltas: list[str] = []
    done = tiny_engine.generate(
        GenerationRequest(_prompt(tiny_engine), 32, SamplingParams(temperature=1.2, seed=5)),
        on_delta=deltas.append,
    )
    assert "".join(deltas) == done.text
    assert all(d for d in deltas)
    for d in deltas:
        d.encode("utf-8")  # a lone surrogate would raise here


def test_cancel_from_another_thread(tiny_engine: Engine) -> None:
    cancel = threading.Event()
    deltas: list[str] = []

    def on_delta(d: str) -> None:
        deltas.append(d)
        if len(deltas) == 3:
            threading.Thread(target=cancel.set).start()

    params = SamplingParams(temperature=1.0, seed=1)
    ctx = tiny_engine.context_length
    prompt = _prompt(tiny_engine)
    done = tiny_engine.generate(GenerationRequest(prompt, ctx - len(prompt), params), on_delta, cancel)
    assert done.finish_reason == "cancelled"
    assert len(done.token_ids) < ctx - len(prompt)


def test_cancel_before_start_generates_nothing(tiny_engine: Engine) -> None:
    cancel = threading.Event()
    cancel.set()
    done = tiny_engine.generate(GenerationRequest(_prompt(tiny_engine), 8), cancel=cancel)
    assert done.finish_reason == "cancelled" and done.token_ids == []


def test_prompt_longer_than_context_names_the_limit(tiny_engine: Engine) -> None:
    long_prompt = _prompt(tiny_engine, "soil moisture " * 200)
    with pytest.raises(TooLarge, match=f"context holds {tiny_engine.context_length}") as err:
        tiny_engine.generate(GenerationRequest(long_prompt, 4))
    assert err.value.code == "too_large" and err.value.limit == tiny_engine.context_length


def test_max_tokens_past_the_context_is_an_error_not_a_clamp(tiny_engine: Engine) -> None:
    prompt = _prompt(tiny_engine)
    with pytest.raises(TooLarge, match="at most"):
        tiny_engine.generate(GenerationRequest(prompt, tiny_engine.context_length))


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"repetition_penalty": 0.0}, {"seed": -5}],
)
def test_bad_sampling_params_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(BadRequest):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_usage_is_reported(tiny_engine: Engine) -> None:
    done = tiny_engine.generate(
        GenerationRequest(_prompt(tiny_engine), 10, SamplingParams(temperature=1.0, seed=2))
    )
    u = done.usage
    assert u.prompt_tokens == len(_prompt(tiny_engine))
    assert u.completion_tokens == len(done.token_ids)
    assert u.time_to_first_token_s > 0 and u.total_s >= u.time_to_first_token_s


def test_deadline_stops_generation(tiny_engine: Engine) -> None:
    import time

    req = GenerationRequest(
        _prompt(tiny_engine),
        50,
        SamplingParams(temperature=1.0, seed=3),
        ignore_eos=True,
        deadline=time.monotonic() - 1,
    )
    done = tiny_engine.generate(req)
    assert done.finish_reason == "deadline" and len(done.token_ids) == 1


# ---------------------------------------------------------------- prompt-prefix reuse, chunks


def test_a_prompt_sharing_the_previous_ones_prefix_reuses_its_rows_and_answers_the_same(
    tiny_pack: LoadedPack,
) -> None:
    """The second question starts like the first (system prompt, preamble): only the rest is
    computed, and every token generated equals what an engine without the cache generates."""
    cached, fresh = Engine(tiny_pack, threads=1), Engine(tiny_pack, threads=1, prefix_cache=False)
    first, second = _prompt(cached, "temperature in bed 1?"), _prompt(cached, "temperature in bed 2?")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    a = cached.generate(GenerationRequest(first, 16))
    b = cached.generate(GenerationRequest(second, 16))
    assert a.usage.cached_prompt_tokens == 0
    assert b.usage.cached_prompt_tokens == shared > 0
    assert b.token_ids == fresh.generate(GenerationRequest(second, 16)).token_ids
    assert fresh.generate(GenerationRequest(second, 16)).usage.cached_prompt_tokens == 0


def test_the_same_prompt_twice_recomputes_only_its_last_token(tiny_engine: Engine) -> None:
    prompt = _prompt(tiny_engine, "soil moisture?")
    a = tiny_engine.generate(GenerationRequest(prompt, 8))
    b = tiny_engine.generate(GenerationRequest(prompt, 8))
    assert b.usage.cached_prompt_tokens == len(prompt) - 1 and a.token_ids == b.token_ids


def test_a_teacher_forced_pass_in_between_leaves_the_cache_consistent(tiny_engine: Engine) -> None:
    prompt = _prompt(tiny_engine, "vents?")
    a = tiny_engine.generate(GenerationRequest(prompt, 8))
    other = (prompt[3] + 1) % tiny_engine.arch.vocab_size
    tiny_engine.logits_for([*prompt[:3], other, 6, 7])  # a health check's own tokens overwrite rows 3..
    b = tiny_engine.generate(GenerationRequest(prompt, 8))
    assert b.usage.cached_prompt_tokens == 3 and a.token_ids == b.token_ids


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_a_prompt_fed_in_chunks_gives_the_same_logits(tiny_pack: LoadedPack, chunk: int) -> None:
    prompt = _prompt(Engine(tiny_pack, threads=1), "a question long enough to span several chunks " * 2)
    whole: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    one = Engine(tiny_pack, threads=1, prefill_chunk=4096, prefix_cache=False)
    one.generate(GenerationRequest(prompt, 4, observe_logits=lambda x: whole.append(x.copy())))
    chunked = Engine(tiny_pack, threads=1, prefill_chunk=chunk, prefix_cache=False)
    chunked.generate(GenerationRequest(prompt, 4, observe_logits=lambda x: parts.append(x.copy())))
    assert len(whole) == len(parts) == 4
    for w, p in zip(whole, parts, strict=True):
        np.testing.assert_allclose(p, w, atol=1e-2 * np.abs(w).max(), rtol=0)


def test_an_answer_start_after_a_completion_prompt_gets_its_space(tiny_pack: LoadedPack) -> None:
    """Gemma's completion template ends "Answer:": the computed "Yes, " must read "Answer: Yes,"
    (a chat turn ends in a newline and takes the start as it is)."""
    import dataclasses

    completion = "{% for m in messages %}Question: {{ m['content'] }}{% endfor %}\\nAnswer:"
    engine = Engine(dataclasses.replace(tiny_pack, chat_template=completion), threads=1)
    text = engine.tokenizer.decode(engine.prompt_ids("vents?", "", answer_start="Yes, "))
    assert text.endswith("Answer: Yes, ") or text.endswith("Answer: Yes,")
    chat = Engine(tiny_pack, threads=1)
    assert chat.tokenizer.decode(chat.prompt_ids("vents?", "", answer_start="Yes, ")).endswith("\nYes, ")


def test_the_heap_is_tuned_for_engines_that_come_and_go() -> None:
    """On glibc the mmap threshold is fixed (large buffers in their own mappings, returned on
    free: ten reloads grew RSS 295 -> 412 MB without, 295 -> 314 with; bench/memory.py)."""
    import platform

    from agent.inference.heap import _libc, fix_mmap_threshold, release_free_heap

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: the allocator has no such knobs, and nothing is tuned")
    assert _libc() is not None and fix_mmap_threshold() is True
    release_free_heap()  # callable any time, returns nothing
