"""Serai's settings: one pydantic-settings class, read from SERAI_* variables and serai.toml.

Precedence, highest first: values passed in code (the CLI's flags), SERAI_* environment
variables, the TOML file (`./serai.toml`, or the path in SERAI_CONFIG), then the defaults here.
Every field carries its help text; docs/configuration.md lists them all and a test keeps the two
in step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

BUNDLED_MODEL_NAME = "gemma-3-270m"

# A pinned model file's SHA-256, as `sha256sum` prints it (either case; kept in lower case).
Sha256 = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True,
                                          pattern=r"^[0-9a-fA-F]{64}$")]


def _config_file() -> Path:
    return Path(os.environ.get("SERAI_CONFIG", "serai.toml"))


class UpstreamSettings(BaseModel):
    """One model served by an OpenAI-compatible server (a `[[upstreams]]` table in serai.toml).

    The API key is never written here: only the name of the variable or the file holding it."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field(min_length=1, description="Name clients request the model under. Several "
                      "upstreams may share it: they are deployments of one model.")
    deployment: str | None = Field(
        None, description="Id of this deployment, unique across upstreams, shown in usage rows. "
        "Unset: `<name>@<host>:<port>` of base_url.")
    aliases: list[str] = Field(default_factory=list,
                               description="More names clients may request the model under.")
    region: str = Field("default", min_length=1,
                        description="Region label of the server, matched against organizations' "
                        "allowed regions.")
    weight: int = Field(1, ge=1, description="Share of the model's traffic relative to its other "
                        "deployments.")
    max_concurrency: int | None = Field(
        None, ge=1, description="Requests this deployment runs at once; past it the router picks "
        "another deployment or answers 503. Unset: no limit.")
    base_url: str = Field(min_length=1,
                          description="The server's OpenAI API root, e.g. http://vllm:8000/v1. "
                          "Credentials in it (`user:pass@`, a query string such as `?api_key=`) "
                          "are refused: name the key with api_key_env or api_key_file.")
    model: str | None = Field(None, description="The upstream's name of the model. Unset: `name`.")
    api_key_env: str | None = Field(None, description="Variable holding the upstream's API key.")
    api_key_file: Path | None = Field(None, description="File holding the upstream's API key.")
    context_length: int = Field(32768, ge=256, description="The upstream model's context window.")
    default_max_tokens: int = Field(
        4096, ge=1, description="Completion limit sent (and reserved) when a request gives none.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to connect to the upstream.")
    read_timeout_s: float = Field(
        120.0, gt=0, description="Seconds to wait for each read, the first token's included.")

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, url: str) -> str:
        # A URL is shown: in deployment ids, usage rows, /metrics labels, logs. A secret in it
        # would be shown with it, so it is refused (without quoting it) rather than stripped.
        parts = urlsplit(url)
        if "@" in parts.netloc:
            raise ValueError("base_url must not carry credentials (`user:password@` before the "
                             "host): put the upstream's API key in the variable api_key_env "
                             "names or the file api_key_file names")
        if parts.query or parts.fragment:
            raise ValueError("base_url must not carry a query string or fragment (`?api_key=…`): "
                             "put the upstream's API key in the variable api_key_env names or "
                             "the file api_key_file names")
        return url

    @model_validator(mode="after")
    def _one_key_source(self) -> UpstreamSettings:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self

    @property
    def api_root(self) -> str:
        """base_url as Serai connects to it and shows it: scheme, host, port and path only. The
        validator keeps secrets out of base_url; this holds even for settings it never saw."""
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, _host_and_port(parts), parts.path, "", ""))

    @property
    def deployment_id(self) -> str:
        if self.deployment:
            return self.deployment
        parts = urlsplit(self.base_url)
        return f"{self.name}@{_host_and_port(parts) or self.api_root}"


def _host_and_port(parts: SplitResult) -> str:
    return parts.netloc.rpartition("@")[2]  # never the userinfo before an `@`


class EmbeddedModelSettings(BaseModel):
    """One GGUF model this process serves (a `[[models]]` table in serai.toml). Unset engine
    values come from the top-level settings of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Name clients request the model under.")
    path: Path | None = Field(None, description="GGUF file to serve. Unset: the bundled Gemma 3 "
                              "270M, prepared into <data_dir>/models.")
    sha256: Sha256 | None = Field(None, description="SHA-256 the model file must have (hex, as "
                                  "sha256sum prints it); checked before the file is loaded. "
                                  "Unset: not pinned.")
    deployment: str | None = Field(None, description="Id of this deployment, unique across all "
                                   "deployments, shown in usage rows. Unset: `<name>@local`.")
    aliases: list[str] = Field(default_factory=list,
                               description="More names clients may request the model under.")
    region: str | None = Field(None, min_length=1,
                               description="Region label of this deployment. Unset: `region`.")
    weight: int = Field(1, ge=1, description="Share of the model's traffic relative to its other "
                        "deployments.")
    context_length: int | None = Field(None, ge=256, description="Context window per sequence. "
                                       "Unset: `context_length`.")
    threads: int | None = Field(None, ge=1, description="CPU threads. Unset: `threads`.")
    parallel: int | None = Field(None, ge=1, le=64, description="Sequences decoded at once. "
                                 "Unset: `engine_parallel`.")
    queue_size: int | None = Field(None, ge=0, description="Requests that may wait for a free "
                                   "sequence. Unset: `engine_queue_size`.")
    prompt_format: Literal["auto", "transcript", "template"] | None = Field(
        None, description="How chat messages become a prompt. Unset: `prompt_format`.")

    @property
    def deployment_id(self) -> str:
        return self.deployment or f"{self.name}@local"


class Settings(BaseSettings):
    # An invalid value is never quoted back in a validation error's text: it may be a secret
    # (a credential in a URL), and the error's text is printed and logged.
    model_config = SettingsConfigDict(env_prefix="SERAI_", extra="forbid",
                                      hide_input_in_errors=True)

    data_dir: Path = Field(
        Path("serai-data"),
        description="Directory for the SQLite database and the prepared bundled model. "
        "Every command acts on the data dir it is given.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the database. Unset: SQLite at <data_dir>/serai.db. "
        "PostgreSQL: postgresql+psycopg://user@host:5432/db.",
    )
    host: str = Field("127.0.0.1", description="Address `serai serve` listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port `serai serve` listens on (0 picks a free one).")
    model: Path | None = Field(
        None,
        description="GGUF file to serve. Unset: the bundled Gemma 3 270M, prepared into "
        "<data_dir>/models on first start.",
    )
    model_sha256: Sha256 | None = Field(
        None,
        description="SHA-256 the `model` file must have (hex, as sha256sum prints it); checked "
        "before the file is loaded. Unset: not pinned (the bundled model is always checked "
        "against its package's SHA-256).",
    )
    model_dirs: list[Path] = Field(
        default_factory=list,
        description="Directories embedded model files may be served from; a file outside them "
        "(symlinks resolved) is refused. Empty: <data_dir>/models and the directory each "
        "configured model file (`model`, `[[models]]` path) is named in.",
    )
    model_name: str | None = Field(
        None,
        description="Name the model is listed and requested under. Unset: `gemma-3-270m` for the "
        "bundled model, otherwise the GGUF file name without its extension.",
    )
    prompt_format: Literal["auto", "transcript", "template"] = Field(
        "auto",
        description="How chat messages become a prompt. `template`: the GGUF's own chat template "
        "(instruction-tuned models). `transcript`: a plain 'User:/Assistant:' transcript with stop "
        "sequences (base models). `auto` decides from the GGUF metadata.",
    )
    context_length: int = Field(
        4096, ge=256,
        description="Context window per sequence (prompt + completion tokens) of the embedded model."
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for the embedded engine. Unset: all cores."
    )
    engine_parallel: int = Field(
        8, ge=1, le=64,
        description="Sequences the embedded engine decodes at once (continuous batching). Each "
        "holds a KV cache of context_length tokens.",
    )
    engine_queue_size: int = Field(
        64, ge=0,
        description="Requests that may wait for a free sequence; past that the API answers 503 "
        "with retry-after.",
    )
    engine_prefill_chunk: int = Field(
        256, ge=16,
        description="Prompt tokens read per decode step, shared by all sequences reading a prompt, "
        "so a long prompt never freezes running streams.",
    )
    engine_batch_invariant: bool = Field(
        True,
        description="Give every request the same output alone or batched with others (same seed, "
        "same text) by using one matmul kernel for every batch width. Off: prompts are read about "
        "20% faster, and greedy answers may differ in late tokens with the load.",
    )
    reservation_timeout_s: float = Field(
        1800, gt=0,
        description="Seconds after which a reservation nobody renewed is taken for one a "
        "crashed process left behind and released (with an `interrupted` usage row), and its "
        "Idempotency-Key stops answering 409. The process running a request renews its "
        "reservation every third of this, so a long request is never taken for a crashed one.",
    )
    count_tokens_rpm: int = Field(
        600, ge=1, le=1_000_000,
        description="Token counts (`/v1/messages/count_tokens`) one key may ask for per minute "
        "in each Serai process (its own `rpm` applies when lower). Counting bills nothing, so it "
        "has this rate of its own.",
    )
    max_stream_s: float = Field(
        900, gt=0,
        description="Seconds a streamed answer may take to send, slow readers included: past it "
        "the stream is closed and what was generated is billed. Bounds how long one client can "
        "hold an engine slot by reading slowly.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL (redis://host:6379/0) through which several Serai processes enforce "
        "rate limits, quota windows and balance reservations together. Unset: the database does it "
        "alone. While Redis cannot be reached, model requests get 503 `limits_unavailable`.",
    )
    redis_prefix: str = Field(
        "serai", min_length=1,
        description="Prefix of every Redis key Serai writes, so several deployments (or test runs) "
        "can share one Redis. Processes that enforce limits together must use the same prefix.",
    )
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Completion limit for requests that give no max_tokens. Unset: the rest of the "
        "context window, as OpenAI does.",
    )
    embedded: bool = Field(
        True,
        description="Serve the embedded GGUF model. Off: only the upstreams are served (a gateway "
        "in front of vLLM, SGLang or other servers).",
    )
    upstreams: list[UpstreamSettings] = Field(
        default_factory=list,
        description="Models served by OpenAI-compatible servers, beside the embedded one: "
        "`[[upstreams]]` tables in serai.toml (see docs/configuration.md).",
    )
    region: str = Field(
        "default", min_length=1,
        description="Region label of the embedded model's deployment (this machine), matched "
        "against organizations' allowed regions.",
    )
    models: list[EmbeddedModelSettings] = Field(
        default_factory=list,
        description="Several embedded GGUF models, each with its own engine: `[[models]]` tables "
        "in serai.toml (see docs/configuration.md). Empty: the one model of `model`.",
    )
    probe_interval_s: float = Field(
        10.0, ge=0,
        description="Seconds between active health probes of each upstream (GET <base_url>/models). "
        "A failed probe counts as a failure before the first byte; a successful one closes an "
        "open circuit. 0: no probes.",
    )
    failover_attempts: int = Field(
        3, ge=1, le=10,
        description="Deployments a request is tried on, one after the other, while they fail "
        "before their first byte (unreachable, 5xx, 429, timeout, full). Never after it.",
    )
    eject_after_failures: int = Field(
        3, ge=1,
        description="Consecutive failures before the first byte after which a deployment is "
        "ejected: it gets no traffic for eject_cooldown_s.",
    )
    eject_cooldown_s: float = Field(
        30.0, gt=0,
        description="Seconds an ejected deployment rests; then one trial request decides whether "
        "it is back (success) or rests again (failure).",
    )
    ray_address: str | None = Field(
        None,
        description="Address of a Ray cluster's head node (`host:6379`, as `ray start --head` "
        "prints it). Set: the "
        "embedded model is served by a Ray Serve application of autoscaled replicas on that "
        "cluster (deployment `<model>@ray`) instead of in this process. Unset: in process.",
    )
    ray_min_replicas: int = Field(
        1, ge=1, description="Fewest Ray Serve replicas of the embedded model, kept even when idle."
    )
    ray_max_replicas: int = Field(
        1, ge=1, description="Most Ray Serve replicas of the embedded model under load."
    )
    ray_target_ongoing_requests: float = Field(
        2, gt=0,
        description="Requests each Ray Serve replica should be running on average: the "
        "autoscaler adds replicas above it and removes them below it.",
    )
    ray_replica_cpus: float = Field(
        1.0, gt=0,
        description="CPUs Ray reserves for each replica (its llama.cpp threads are `threads`).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web origins (`https://console.example.com`) whose pages may call the API "
        "from a browser (CORS). Empty: none, and no CORS headers are sent. `*`: any origin.",
    )
    tls_certfile: Path | None = Field(
        None,
        description="PEM certificate (chain) `serai serve` presents: set it and `tls_keyfile` to "
        "serve HTTPS. Unset: plain HTTP (put a TLS-terminating proxy in front).",
    )
    tls_keyfile: Path | None = Field(
        None, description="PEM private key of `tls_certfile`.",
    )
    admin_port: int | None = Field(
        None, ge=1, le=65535,
        description="Serve the admin API (/admin/...) on this port only: `serai serve` listens "
        "on it as well as on `port`, which then answers 404 for /admin, while this port answers "
        "404 for everything else (health checks aside). Unset: one port serves both.")
    admin_host: str | None = Field(
        None, description="Address the admin port listens on (with `admin_port`; for instance "
        "127.0.0.1 or an internal interface). Unset: `host`.")
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="Largest request head (the request line and headers); "
        "a larger one gets 431 and its connection is closed, `serai serve` cutting it as it "
        "arrives."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a client has to send a request's head, from the "
        "connection opening (or its first byte, for later requests on a kept-alive connection) "
        "to the end of its headers; a slower one gets 408 and its connection is closed, so "
        "clients sending headers byte by byte cannot hold connections open."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted; larger ones get 413."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the server."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="How `serai serve` writes its log: `json` (one object per line), "
        "`text` (for people), or `auto`: text on a terminal, JSON otherwise.")
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token GET /metrics requires (`Authorization: Bearer <token>`); "
        "others get 401. Unset: /metrics is open to whoever reaches its port.")
    metrics_port: int | None = Field(
        None, ge=1, le=65535,
        description="Serve /metrics on this port only: `serai serve` listens on it as well, and "
        "it answers 404 for everything else (health checks aside). Unset: /metrics is on `port`.")
    secret_key: SecretStr | None = Field(
        None,
        description="AES-256 keys (base64 of 32 bytes, `openssl rand -base64 32`) that encrypt "
        "stored completions, comma-separated, newest first: new content uses the first, older "
        "content opens with any listed key. Unset (and no secret_key_file): `store: true` "
        "requests get 503 `content_key_missing`.",
    )
    secret_key_file: Path | None = Field(
        None,
        description="File holding more such keys, one per line, newest first (after those of "
        "secret_key). A missing file or a malformed key stops start-up.",
    )
    otel_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP base URL of an OpenTelemetry collector (http://collector:4318): "
        "spans of every model request go to <endpoint>/v1/traces. Needs `pip install "
        "'serai[otel]'`. Unset: no tracing, and the OpenTelemetry SDK is never loaded.",
    )
    otel_service_name: str = Field(
        "serai", min_length=1, description="service.name of the spans Serai exports."
    )

    @model_validator(mode="after")
    def _unique_deployments(self) -> Settings:
        seen: set[str] = set()
        everything: list[EmbeddedModelSettings | UpstreamSettings] = [*self.embedded_models,
                                                                       *self.upstreams]
        for declared in everything:
            if declared.deployment_id in seen:
                kind = "models" if isinstance(declared, EmbeddedModelSettings) else "upstreams"
                raise ValueError(f"two {kind} are the deployment {declared.deployment_id!r}: "
                                 "give them distinct `deployment` ids")
            seen.add(declared.deployment_id)
        return self

    @property
    def embedded_models(self) -> list[EmbeddedModelSettings]:
        """The embedded models to serve, every unset engine value filled in from the top-level
        settings: the `[[models]]` tables, or else the one model `model` names."""
        if not self.embedded:
            return []
        declared = self.models or [EmbeddedModelSettings(
            name=self.model_name or (BUNDLED_MODEL_NAME if self.model is None
                                     else self.model.expanduser().stem),
            path=self.model, sha256=self.model_sha256)]
        return [m.model_copy(update={
            "region": m.region or self.region,
            "context_length": m.context_length or self.context_length,
            "threads": m.threads or self.threads,
            "parallel": m.parallel or self.engine_parallel,
            "queue_size": self.engine_queue_size if m.queue_size is None else m.queue_size,
            "prompt_format": m.prompt_format or self.prompt_format,
        }) for m in declared]

    @model_validator(mode="after")
    def _admin_port_apart(self) -> Settings:
        if self.admin_port is not None and self.admin_port == self.port:
            raise ValueError(f"admin_port ({self.admin_port}) must differ from port")
        return self

    @model_validator(mode="after")
    def _metrics_port_apart(self) -> Settings:
        if self.metrics_port is not None and self.metrics_port in (self.port, self.admin_port):
            raise ValueError(f"metrics_port ({self.metrics_port}) must differ from port and "
                             "admin_port")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("give tls_certfile and tls_keyfile together, or neither")
        return self

    @model_validator(mode="after")
    def _replica_range(self) -> Settings:
        if self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError(f"ray_min_replicas ({self.ray_min_replicas}) is above "
                             f"ray_max_replicas ({self.ray_max_replicas})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file())
        return (init_settings, env_settings, toml)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'serai.db').resolve()}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


def load_settings(**overrides: object) -> Settings:
    """Build the settings once; `overrides` are CLI flags the user actually gave (None is dropped)."""
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**given)
