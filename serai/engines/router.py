"""Maps the model names clients ask for to the engines that serve them."""

from __future__ import annotations

from collections.abc import Iterable

from serai.engines.base import Engine, ModelInfo
from serai.errors import UnknownModel


class Router:
    def __init__(self, engines: Iterable[Engine] = ()) -> None:
        self._engines: dict[str, Engine] = {}
        for engine in engines:
            self.add(engine)

    def add(self, engine: Engine) -> None:
        name = engine.model.name
        if name in self._engines:
            raise ValueError(f"two engines serve the model name {name!r}")
        self._engines[name] = engine

    def engine_for(self, model: str) -> Engine:
        try:
            return self._engines[model]
        except KeyError:
            raise UnknownModel(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            ) from None

    def models(self) -> list[ModelInfo]:
        return [engine.model for engine in self._engines.values()]

    async def aclose(self) -> None:
        for engine in self._engines.values():
            await engine.aclose()
