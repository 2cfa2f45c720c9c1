"""Continuous batching on one llama.cpp context: many sequences per `llama_decode` call.

One thread owns the context. Each step it builds one batch from (a) the next token of every
sequence that is generating and (b) a bounded chunk of prompt tokens of sequences still reading
their prompt, decodes it once, and samples each generating sequence at its own batch index with
its own sampler chain. Requests join between steps and leave the moment they finish, so a long
prompt never freezes running streams and a new user never waits for the others to finish.

Each slot (a llama.cpp sequence id) keeps its KV cache after its request ends. A new request is
placed in the free slot whose cached tokens share the longest prefix with its prompt; only the
rest is removed (`llama_memory_seq_rm`) and recomputed, so a shared system prompt is read once.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp

from serai.engines.decoding import TextAssembler
from serai.types import Chunk, FinishReason, SamplingParams, Usage

log = logging.getLogger("serai.engines.batching")


@dataclass(eq=False, slots=True)
class Sequence:
    """One request as the scheduler sees it."""

    request_id: str
    tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...]
    strip_leading_space: bool
    emit: Callable[[Chunk | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # GBNF the generated text must match (tool calls, structured output); None: free text.
    grammar: str | None = None


@dataclass(eq=False, slots=True)
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in this sequence
    last_used: int = 0
    job: Sequence | None = None
    # per-request state
    prompt_left: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet decoded
    sampler: llama_cpp.llama_sampler_p | None = None
    text: TextAssembler | None = None
    generated: int = 0
    reused: int = 0  # prompt tokens kept from the cache
    strip_space: bool = False


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class BatchScheduler:
    """Owns a llama.cpp context with `parallel` sequences and runs the decode loop thread."""

    def __init__(
        self,
        *,
        model: llama_cpp.llama_model_p,
        vocab: llama_cpp.llama_vocab_p,
        detokenize: Callable[[int], bytes],
        parallel: int,
        context_per_sequence: int,
        prefill_chunk: int,
        threads: int,
    ) -> None:
        self._vocab = vocab
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._detokenize = detokenize
        self._prefill_chunk = prefill_chunk
        self.context_per_sequence = context_per_sequence
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context_per_sequence * parallel
        params.n_seq_max = parallel
        params.n_batch = params.n_ubatch = prefill_chunk + parallel
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False
        # Full-size sliding-window cache: a kept prefix stays usable on SWA layers too.
        params.swa_full = True
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context with these settings")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._slots = [_Slot(seq_id=i) for i in range(parallel)]
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._waiting: deque[Sequence] = deque()
        self._clock = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return sum(1 for s in self._slots if s.job is not None)

    # Read from other threads (metrics scrapes) without a lock: sizes only, momentarily stale.
    @property
    def waiting(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Share of the context's cells holding tokens: running sequences and kept prefixes."""
        capacity = self.context_per_sequence * len(self._slots)
        return sum(len(s.cached) for s in self._slots) / capacity

    def submit(self, job: Sequence) -> None:
        self._inbox.put(job)

    def close(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join()
        for slot in self._slots:
            self._free_sampler(slot)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)

    # -- the decode loop (scheduler thread only) -------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            idle = not self._waiting and self.running == 0
            if not self._take_inbox(block=idle):
                return
            self._drop_cancelled()
            self._place_waiting()
            if self.running:
                try:
                    self._step()
                except Exception as exc:  # a decode failure ends every request in the batch
                    log.exception("decode step failed")
                    for slot in self._slots:
                        if slot.job is not None:
                            slot.job.emit(exc)
                            self._release(slot, reset_cache=True)

    def _take_inbox(self, *, block: bool) -> bool:
        """Move new requests to the waiting line; False when asked to stop."""
        try:
            job = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if job is None:
                return False
            self._waiting.append(job)
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _drop_cancelled(self) -> None:
        if any(j.cancelled.is_set() for j in self._waiting):
            self._waiting = deque(j for j in self._waiting if not j.cancelled.is_set())
        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled.is_set():
                self._release(slot)

    def _place_waiting(self) -> None:
        """First come, first served: the oldest waiting request takes the best free slot."""
        while self._waiting:
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            slot = max(free, key=lambda s: (_common_prefix(s.cached, job.tokens), -s.last_used))
            try:
                self._start(slot, job)
            except Exception as exc:  # this request fails; the loop and the others go on
                log.exception("could not start %s", job.request_id)
                job.emit(exc)
                self._release(slot, reset_cache=True)

    def _start(self, slot: _Slot, job: Sequence) -> None:
        # Keep the shared prefix, but always recompute the last prompt token: its logits are
        # what the first sample is drawn from.
        keep = min(_common_prefix(slot.cached, job.tokens), len(job.tokens) - 1)
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            keep = 0
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.cached = job.tokens[:keep]
        slot.job = job
        slot.prompt_left = job.tokens[keep:]
        slot.next_token = None
        slot.generated = 0
        slot.reused = keep
        slot.text = TextAssembler(job.stops)
        slot.strip_space = job.strip_leading_space
        slot.sampler = self._sampler(job.sampling, job.grammar)
        self._clock += 1
        slot.last_used = self._clock
        log.debug("%s placed in slot %d reusing %d cached tokens", job.request_id, slot.seq_id, keep)

    def _sampler(self, sampling: SamplingParams, grammar: str | None = None
                 ) -> llama_cpp.llama_sampler_p:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if grammar is not None:
            # First: the other samplers only ever choose among tokens the grammar allows.
            constrained = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(),
                                                               b"root")
            if not constrained:
                llama_cpp.llama_sampler_free(chain)
                raise ValueError("llama.cpp could not parse the grammar")
            add(chain, constrained)
        if (sampling.repetition_penalty != 1.0 or sampling.frequency_penalty
                or sampling.presence_penalty):
            add(chain, llama_cpp.llama_sampler_init_penalties(
                self._n_vocab, 64, sampling.repetition_penalty, sampling.frequency_penalty,
                sampling.presence_penalty))
        if sampling.temperature == 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1.0:
            add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        if sampling.min_p > 0.0:
            add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _step(self) -> None:
        batch = self._batch
        batch.n_tokens = 0
        sample_at: list[tuple[_Slot, int]] = []

        def add(slot: _Slot, token: int, wants_logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = len(slot.cached)
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq_id
            batch.logits[i] = wants_logits
            batch.n_tokens = i + 1
            slot.cached.append(token)
            if wants_logits:
                sample_at.append((slot, i))

        # Generating sequences first: one token each, so streams never stall behind a prompt.
        for slot in self._slots:
            if slot.job is not None and slot.next_token is not None:
                add(slot, slot.next_token, True)
                slot.next_token = None
        budget = self._prefill_chunk
        for slot in sorted((s for s in self._slots if s.job is not None and s.prompt_left),
                           key=lambda s: s.last_used):
            if budget <= 0:
                break
            take = slot.prompt_left[:budget]
            slot.prompt_left = slot.prompt_left[len(take):]
            budget -= len(take)
            for k, token in enumerate(take):
                add(slot, token, wants_logits=not slot.prompt_left and k == len(take) - 1)
        if batch.n_tokens == 0:
            return
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for slot, index in sample_at:
            self._advance(slot, index)

    def _advance(self, slot: _Slot, index: int) -> None:
        job, text = slot.job, slot.text
        assert job is not None and text is not None and slot.sampler is not None
        token = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, index)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop", text.finish())
            return
        slot.generated += 1
        piece = text.feed(self._detokenize(token))
        if slot.strip_space and piece:
            piece = piece.lstrip(" ")
            slot.strip_space = not piece
        if text.stopped:
            self._finish(slot, "stop", piece)
            return
        if slot.generated >= job.max_tokens:
            self._finish(slot, "length", piece + text.finish())
            return
        if piece:
            job.emit(Chunk(piece, Usage(len(job.tokens), slot.generated, slot.reused)))
        slot.next_token = token

    def _finish(self, slot: _Slot, reason: FinishReason, last: str) -> None:
        job = slot.job
        assert job is not None
        if slot.strip_space:
            last = last.lstrip(" ")
        stop = slot.text.stop_sequence if slot.text is not None else None
        job.emit(Chunk(last, Usage(len(job.tokens), slot.generated, slot.reused), reason,
                       stop_sequence=stop))
        self._release(slot)

    def _release(self, slot: _Slot, *, reset_cache: bool = False) -> None:
        self._free_sampler(slot)
        slot.job = None
        slot.prompt_left = []
        slot.next_token = None
        slot.text = None
        if reset_cache:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.cached = []

    def _free_sampler(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            llama_cpp.llama_sampler_free(slot.sampler)
            slot.sampler = None

