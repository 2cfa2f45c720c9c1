"""The embedded engine: a GGUF model run in-process by llama.cpp (llama-cpp-python).

The event loop only tokenizes, checks limits and relays chunks; decoding happens on the
BatchScheduler's thread, many requests per llama_decode call (see engines/batching.py). A
consumer that stops reading cancels its sequence, which leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp

from serai.engines import tool_calls
from serai.engines.base import EngineStats, Measure, ModelInfo
from serai.engines.batching import BatchScheduler, Sequence
from serai.engines.models import check_gguf
from serai.engines.prompts import PromptFormat, choose_prompt_format
from serai.errors import ContextLengthExceeded, EngineOverloaded, EngineUnavailable, InvalidRequest
from serai.types import Chunk, GenerationRequest

log = logging.getLogger("serai.engines.llamacpp")


RETRY_AFTER_S = 1
MEASURED_KEPT = 1024
MEASURED_TOKENS_KEPT = 1_000_000  # about 40 MB of token lists
PREPARE_THREADS = 2  # tokenizing and grammar compiling, apart from the default executor
PREPARE_WAITING = 64  # requests waiting to be (or being) prepared before more get 503
GRAMMARS_KEPT = 256  # grammars llama.cpp has parsed: a client sends the same tools each turn
GRAMMAR_BYTES_KEPT = 8 * 1024 * 1024  # ... and their size: one may be half a megabyte


def _longest_token_bytes(vocab: llama_cpp.llama_vocab_p) -> int:
    """Bytes of the vocabulary's longest token (48 for Gemma 3's 262,144; 0.3 s to find)."""
    piece = (ctypes.c_char * 256)()
    return max(1, max(llama_cpp.llama_token_to_piece(vocab, token, piece, len(piece), 0, True)
                      for token in range(llama_cpp.llama_vocab_n_tokens(vocab))))


class KnownGrammars:
    """Grammar texts already known to parse, most recently used last (clients send the same
    tools every turn). Bounded in bytes as well as in number: one grammar may be as large as
    MAX_GRAMMAR_BYTES (engines/grammar.py). Safe to share between threads."""

    def __init__(self, *, most: int, most_bytes: int) -> None:
        self._most, self._most_bytes = most, most_bytes
        self._texts: OrderedDict[str, int] = OrderedDict()  # text -> its size in bytes
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def size(self) -> int:
        """Bytes of all the grammars kept."""
        return self._bytes

    def seen(self, grammar: str) -> bool:
        """Whether `grammar` is known (and now the most recently used)."""
        with self._lock:
            if grammar not in self._texts:
                return False
            self._texts.move_to_end(grammar)
            return True

    def add(self, grammar: str) -> None:
        size = len(grammar.encode())
        with self._lock:
            if grammar in self._texts or size > self._most_bytes:
                return
            self._texts[grammar] = size
            self._bytes += size
            while len(self._texts) > self._most or self._bytes > self._most_bytes:
                self._bytes -= self._texts.popitem(last=False)[1]


def _unset_emit(item: object) -> None:
    raise RuntimeError("a sequence was scheduled before generate() gave it a consumer")


class LlamaCppEngine:
    def __init__(
        self,
        path: Path,
        *,
        name: str,
        context_length: int = 4096,
        threads: int | None = None,
        prompt_format: str = "auto",
        default_max_tokens: int | None = None,
        parallel: int = 8,
        queue_size: int = 64,
        prefill_chunk: int = 256,
        batch_invariant: bool = True,
    ) -> None:
        check_gguf(path)
        threads = threads or os.cpu_count() or 1
        # The tokenizer and metadata only: the weights are loaded once, below, for the
        # scheduler's context.
        self._vocab_only = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        model_params = llama_cpp.llama_model_default_params()
        if batch_invariant:
            # llama.cpp's CPU matmuls pick kernels by batch width: repacked weights use a 4-column
            # gemm beside a 1-column gemv, and plain K-quant weights a tiled kernel for wide
            # batches. Their sums round differently, so a greedy answer could change with the
            # number of requests sharing the step. Without both, every column goes through the
            # same dot product and an answer is the same alone or in a batch (prompt reading
            # costs about 20% more on a 2-core x86 machine; decoding the same).
            # GGML_CPU_TILED_MM is read once per process, at the first matmul.
            model_params.use_extra_bufts = False
            os.environ.setdefault("GGML_CPU_TILED_MM", "0")
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise EngineUnavailable(f"llama.cpp could not load {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._format: PromptFormat = choose_prompt_format(
            prompt_format,  # type: ignore[arg-type]  # the settings allow only a format's name
            self._vocab_only.metadata,
            path.name,
            bos_token=self._token_text(self._vocab_only.token_bos()),
            eos_token=self._token_text(self._vocab_only.token_eos()),
        )
        self._default_max_tokens = default_max_tokens
        self._info = ModelInfo(name=name, context_length=context_length,
                               created=int(path.stat().st_mtime))
        self._measured: OrderedDict[str, Sequence] = OrderedDict()
        self._measured_tokens = 0
        self._preparing = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="serai-prepare")
        self._preparing_waiting = 0
        self._grammars = KnownGrammars(most=GRAMMARS_KEPT, most_bytes=GRAMMAR_BYTES_KEPT)
        self._capacity = parallel + queue_size
        self._admitted = 0
        self._closed = False
        self._scheduler = BatchScheduler(
            model=self._model, vocab=self._vocab, detokenize=self._piece, parallel=parallel,
            context_per_sequence=context_length, prefill_chunk=prefill_chunk, threads=threads)
        log.info("serving %s from %s (%s prompt format, %d threads, %d parallel sequences)",
                 name, path, self._format.name, threads, parallel)

    @property
    def model(self) -> ModelInfo:
        return self._info

    def stats(self) -> EngineStats:
        return EngineStats(waiting=self._scheduler.waiting, running=self._scheduler.running,
                           kv_cache_usage=self._scheduler.kv_cache_usage)

    @property
    def prompt_format(self) -> str:
        return self._format.name

    def _token_text(self, token: int) -> str:
        return self._vocab_only.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes:
        return self._vocab_only.detokenize([token])

    async def _prepared(self, request: GenerationRequest) -> Sequence:
        """`_prepare` on the engine's own preparing threads. Tokenizing a long prompt and
        compiling a grammar take CPU seconds a hostile request can choose; on the default
        executor they would hold the threads that authentication and the ledger run on.
        Requests past the waiting line get 503, so waiting work is bounded too."""
        if self._preparing_waiting >= PREPARE_WAITING:
            raise EngineOverloaded(
                "The model is reading as many prompts as it can hold; retry shortly.",
                headers={"retry-after": str(RETRY_AFTER_S)})
        self._preparing_waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._preparing, self._prepare, request, _unset_emit)
        finally:
            self._preparing_waiting -= 1

    async def measure(self, request: GenerationRequest) -> Measure:
        sequence = await self._prepared(request)
        # Kept for generate(), so a measured prompt is tokenized once; the oldest are dropped
        # (a request refused by admission never comes back for it). Bounded in tokens as well
        # as entries: a thousand long prompts refused after measuring would hold gigabytes.
        self._forget_measured(request.request_id)
        self._measured[request.request_id] = sequence
        self._measured_tokens += len(sequence.tokens)
        while self._measured and (len(self._measured) > MEASURED_KEPT
                                  or self._measured_tokens > MEASURED_TOKENS_KEPT):
            self._forget_measured(next(iter(self._measured)))
        return Measure(len(sequence.tokens), sequence.max_tokens)

    def _forget_measured(self, request_id: str) -> Sequence | None:
        sequence = self._measured.pop(request_id, None)
        if sequence is not None:
            self._measured_tokens -= len(sequence.tokens)
        return sequence

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        if self._closed:
            raise EngineUnavailable("The model is shutting down; retry on another server.")
        if self._admitted >= self._capacity:
            raise EngineOverloaded(
                "The model is serving as many requests as it can and its waiting line is full. "
                "Retry shortly.", headers={"retry-after": str(RETRY_AFTER_S)})
        self._admitted += 1
        try:
            loop = asyncio.get_running_loop()
            out: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
            sequence = self._forget_measured(request.request_id)
            if sequence is None:
                sequence = await self._prepared(request)
            def emit(item: Chunk | BaseException) -> None:  # from the scheduler's thread
                loop.call_soon_threadsafe(out.put_nowait, item)

            sequence.emit = emit
            self._scheduler.submit(sequence)
            try:
                chunks = self._relay(out)
                if tool_calls.offers_calls(request):
                    chunks = tool_calls.read_calls(chunks, request)
                async for chunk in chunks:
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
            finally:
                sequence.cancelled.set()
        finally:
            self._admitted -= 1

    @staticmethod
    async def _relay(out: asyncio.Queue[Chunk | BaseException]) -> AsyncIterator[Chunk]:
        while True:
            item = await out.get()
            if isinstance(item, BaseException):
                raise EngineUnavailable(f"The model failed while generating: {item}")
            yield item
            if item.finish_reason is not None:
                return

    def _prepare(self, request: GenerationRequest,
                 emit: Callable[[Chunk | BaseException], None]) -> Sequence:
        """Tokenize and check the request against the context window (off the event loop;
        the tokenizer only reads the vocabulary, so it is safe beside a running decode)."""
        stops = request.sampling.stop
        strip = False
        llm = self._vocab_only
        grammar = None
        if request.messages is not None:
            grammar = tool_calls.answer_grammar(request)
            if grammar is not None:
                self._check_grammar(grammar)
            prompt = self._format.render(tool_calls.prompt_messages(request))
            text = self._fits(prompt.text.encode(), "messages")
            tokens = llm.tokenize(text, add_bos=not prompt.has_special_tokens,
                                  special=prompt.has_special_tokens)
            stops = stops + prompt.stops
            strip = prompt.strip_leading_space
            where = "messages"
        else:
            assert request.prompt is not None
            if request.tools or request.response_format is not None:
                raise InvalidRequest("Tools and response_format need messages, not a prompt.",
                                     param="prompt")
            tokens = llm.tokenize(self._fits(request.prompt.encode(), "prompt"), add_bos=True,
                                  special=False)
            where = "prompt"
        n_ctx = self._info.context_length
        room = n_ctx - len(tokens)
        wanted = request.sampling.max_tokens
        if wanted is not None and request.sampling.clamp_max_tokens:
            wanted = min(wanted, max(room, 1))
        if room < 1 or (wanted is not None and wanted > room):
            asked = len(tokens) + (wanted or 1)
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{asked} tokens ({len(tokens)} in the {where}, {wanted or 1} in the completion). "
                f"Please reduce the length of the {where} or the completion.",
                param=where if room < 1 else "max_tokens",
            )
        if wanted is None:
            wanted = min(room, self._default_max_tokens or room)
        return Sequence(request_id=request.request_id, tokens=tokens, max_tokens=wanted,
                        sampling=request.sampling, stops=stops, strip_leading_space=strip,
                        emit=emit, grammar=grammar)

    def _fits(self, text: bytes, where: str) -> bytes:
        """`text`, unless it is surely too long for the context: no token is longer than the
        vocabulary's longest, so a text of more bytes than the context holds of those is
        refused without tokenizing it (4 MB took the tokenizer 4 s of CPU)."""
        n_ctx = self._info.context_length
        # The longest token is a byte at least, so a text no longer than the context in bytes
        # always passes; only a longer one needs it, found once then (not at every start-up).
        if len(text) > n_ctx and len(text) > n_ctx * self._longest_token:
            at_least = len(text) // self._longest_token
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens. However, the {where} "
                f"holds at least {at_least} tokens ({len(text)} bytes). Please reduce the length "
                f"of the {where}.", param=where)
        return text

    @functools.cached_property
    def _longest_token(self) -> int:
        return _longest_token_bytes(self._vocab)

    def _check_grammar(self, grammar: str) -> None:
        """Refuse a grammar llama.cpp cannot parse before the request is admitted."""
        if self._grammars.seen(grammar):
            return
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise InvalidRequest("The tools or response_format schema cannot be turned into a "
                                 "grammar for this model.", param="tools")
        llama_cpp.llama_sampler_free(sampler)
        self._grammars.add(grammar)  # _prepare runs on worker threads: KnownGrammars locks

    async def aclose(self) -> None:
        self._closed = True
        self._preparing.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._scheduler.close)
        llama_cpp.llama_model_free(self._model)
        self._vocab_only.close()
