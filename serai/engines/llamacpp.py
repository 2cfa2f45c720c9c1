"""The embedded engine: a GGUF model run in-process by llama.cpp (llama-cpp-python).

One worker thread owns the llama context and runs one generation at a time, first come first
served; the event loop only tokenizes, queues and relays chunks, so it never waits on the model.
A consumer that stops reading sets its job's cancel flag, and the worker stops at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from serai.engines.base import ModelInfo
from serai.engines.decoding import TextAssembler
from serai.engines.prompts import PromptFormat, choose_prompt_format
from serai.errors import ContextLengthExceeded, EngineUnavailable
from serai.models import check_gguf
from serai.types import Chunk, FinishReason, GenerationRequest, Usage

log = logging.getLogger("serai.engines.llamacpp")


@dataclass(slots=True)
class _Job:
    tokens: list[int]
    max_tokens: int
    request: GenerationRequest
    stops: tuple[str, ...]
    strip_leading_space: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Chunk | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Chunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


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
    ) -> None:
        check_gguf(path)
        threads = threads or os.cpu_count() or 1
        self._llm = llama_cpp.Llama(
            str(path), n_ctx=context_length, n_threads=threads, n_threads_batch=threads,
            verbose=False,
        )
        self._vocab = self._llm._model.vocab
        self._format: PromptFormat = choose_prompt_format(
            prompt_format,  # type: ignore[arg-type]
            self._llm.metadata,
            path.name,
            bos_token=self._token_text(self._llm.token_bos()),
            eos_token=self._token_text(self._llm.token_eos()),
        )
        self._default_max_tokens = default_max_tokens
        self._info = ModelInfo(name=name, context_length=context_length,
                               created=int(path.stat().st_mtime))
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name=f"engine-{name}", daemon=True)
        self._worker.start()
        log.info("serving %s from %s (%s prompt format, %d threads)", name, path,
                 self._format.name, threads)

    @property
    def model(self) -> ModelInfo:
        return self._info

    @property
    def prompt_format(self) -> str:
        return self._format.name

    def _token_text(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self._closed:
            raise EngineUnavailable("The model is shutting down; retry on another server.")
        job = await asyncio.to_thread(self._prepare, request, asyncio.get_running_loop())
        self._jobs.put(job)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()

    def _prepare(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> _Job:
        """Tokenize and check the request against the context window (off the event loop;
        the tokenizer only reads the vocabulary, so it is safe beside a running generation)."""
        stops = request.sampling.stop
        strip = False
        if request.messages is not None:
            prompt = self._format.render(request.messages)
            tokens = self._llm.tokenize(prompt.text.encode(), add_bos=not prompt.has_special_tokens,
                                        special=prompt.has_special_tokens)
            stops = stops + prompt.stops
            strip = prompt.strip_leading_space
            where = "messages"
        else:
            assert request.prompt is not None
            tokens = self._llm.tokenize(request.prompt.encode(), add_bos=True, special=False)
            where = "prompt"
        n_ctx = self._info.context_length
        room = n_ctx - len(tokens)
        wanted = request.sampling.max_tokens
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
        return _Job(tokens=tokens, max_tokens=wanted, request=request, stops=stops,
                    strip_leading_space=strip, loop=loop)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except Exception as exc:
                log.exception("generation %s failed", job.request.request_id)
                job.emit(EngineUnavailable(f"The model failed while generating: {exc}"))

    def _run(self, job: _Job) -> None:
        sampling = job.request.sampling
        self._llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(32))
        text = TextAssembler(job.stops)
        prompt_tokens = len(job.tokens)
        generated = 0
        finish: FinishReason = "length"
        last = ""  # text released together with the finish reason
        strip_space = job.strip_leading_space
        tokens = self._llm.generate(
            job.tokens, temp=sampling.temperature, top_p=sampling.top_p,
            top_k=0, min_p=0.0, repeat_penalty=1.0,
        )
        try:
            for token in tokens:
                if job.cancelled.is_set():
                    return
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                generated += 1
                piece = text.feed(self._llm.detokenize([token]))
                if strip_space and piece:
                    piece = piece.lstrip(" ")
                    strip_space = not piece
                if text.stopped:
                    finish, last = "stop", piece
                    break
                if piece:
                    job.emit(Chunk(piece, Usage(prompt_tokens, generated)))
                if generated >= job.max_tokens:
                    break
        finally:
            tokens.close()
        if not text.stopped:
            last = text.finish()
            if strip_space:
                last = last.lstrip(" ")
        job.emit(Chunk(last, Usage(prompt_tokens, generated), finish))

    async def aclose(self) -> None:
        self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._worker.join)
        self._llm.close()
