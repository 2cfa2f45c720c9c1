"""Real client programs against a live Serai: llm, LangChain, aider and Claude Code.

Each test configures the client the way docs/clients.md tells a user to, runs it, and asserts
what the client got back. The SDKs judge the wire format; these tests judge that programs built
on them (with their own retries, streaming parsers and tool loops) work unchanged.

llm and langchain-openai come with the [test] extra. aider and Claude Code are installed on
first use into .cache/clients (see tests/support/clients.py): aider into a venv of its own,
Claude Code with npm, which a machine without Node.js lacks (the test skips then).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from serai.billing import settlement
from serai.storage.tables import UsageRow
from tests.conftest import LiveServer, _missing, start_server, stop_server
from tests.support.clients import npm_client, python_client

pytestmark = [pytest.mark.live, pytest.mark.clients]

MODEL = "gemma-3-270m"
AIDER = "aider-chat==0.86.2"
CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.332"
# Claude Code sends a system prompt and a dozen tool definitions of about 11.5k tokens with every
# request; the bundled model reads 32k. Two sequences keep the KV cache near 1.2 GiB.
CONTEXT_LENGTH = 32768


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("clients")
    live = start_server(root / "serai-data", extra_env={
        "SERAI_CONTEXT_LENGTH": str(CONTEXT_LENGTH), "SERAI_ENGINE_PARALLEL": "2"})
    yield live
    stop_server(live)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def key(server: LiveServer) -> str:
    result = server.cli("keys", "create", "--name", "clients")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def usage_since(server: LiveServer, last_id: int) -> list[UsageRow]:
    """Usage rows written after row `last_id`, oldest first: the requests a client made."""
    database = server.database
    try:
        with database.session() as session:
            rows = settlement.recent_usage(session=session, limit=1000)
    finally:
        database.dispose()
    return sorted((r for r in rows if r.id > last_id), key=lambda r: r.id)


def last_usage_id(server: LiveServer) -> int:
    rows = usage_since(server, 0)
    return rows[-1].id if rows else 0


def run(args: list[str | Path], *, env: dict[str, str], cwd: Path,
        timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)
    return result


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: a temp HOME, no proxy or key of the developer's leaking in."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
           "TERM": "dumb", "NO_COLOR": "1"}
    env.update(extra)
    return env


# llm (https://llm.datasette.io): Serai as an "extra OpenAI model" in LLM_USER_PATH.

@pytest.fixture
def llm_home(tmp_path: Path, server: LiveServer, key: str) -> Path:
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: serai\n"
        f"  model_name: {MODEL}\n"
        f"  api_base: {server.base_url}/v1\n"
        f"  api_key_name: serai\n")
    (home / "keys.json").write_text(json.dumps({"serai": key}))
    return home


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_llm_prompt(llm_home: Path, tmp_path: Path, stream: bool) -> None:
    args: list[str | Path] = [sys.executable, "-m", "llm", "-m", "serai", "-o", "temperature", "0",
                              "What is the capital of Japan?"]
    if not stream:
        args.insert(3, "--no-stream")
    result = run(args, env=client_env(tmp_path / "home", LLM_USER_PATH=str(llm_home)),
                 cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Tokyo" in result.stdout
    # llm logged the exchange with the usage Serai reported.
    logs = run([sys.executable, "-m", "llm", "logs", "--json", "-n", "1"],
               env=client_env(tmp_path / "home", LLM_USER_PATH=str(llm_home)), cwd=tmp_path,
               timeout=60)
    entry = json.loads(logs.stdout)[0]
    assert entry["model"] == "serai" and "Tokyo" in entry["response"]
    assert entry["response_json"]["model"] == MODEL
    assert entry["input_tokens"] > 5 and entry["output_tokens"] > 0


# LangChain: ChatOpenAI pointed at Serai's OpenAI surface.

@pytest.fixture
def chat(server: LiveServer, key: str):  # noqa: ANN201 (langchain is imported lazily)
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=f"{server.base_url}/v1", api_key=key,
                      temperature=0, max_retries=0, timeout=120)


def test_langchain_invoke_and_stream(chat) -> None:  # noqa: ANN001
    message = chat.invoke("What is the capital of Japan?")
    assert "Tokyo" in message.content
    assert message.usage_metadata["input_tokens"] > 5
    assert message.response_metadata["finish_reason"] == "stop"

    chunks = list(chat.stream("What is the capital of Japan?"))
    assert len(chunks) > 2
    assert "Tokyo" in "".join(c.content for c in chunks)


def test_langchain_bind_tools(chat) -> None:  # noqa: ANN001
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"18 degrees and sunny in {city}"

    question = HumanMessage("What is the weather in Paris?")
    forced = chat.bind_tools([get_weather], tool_choice="get_weather")
    answer = forced.invoke([question])
    assert answer.tool_calls, answer
    call = answer.tool_calls[0]
    assert call["name"] == "get_weather"
    assert isinstance(call["args"].get("city"), str) and call["id"]
    assert answer.response_metadata["finish_reason"] == "tool_calls"

    # Streamed, the call arrives in tool_call_chunks that LangChain joins into the same shape.
    chunks = list(forced.stream([question]))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    assert [c["name"] for c in joined.tool_calls] == ["get_weather"], joined
    assert isinstance(joined.tool_calls[0]["args"].get("city"), str)

    # The tool's result goes back as a `tool` message after the assistant's call; asked
    # without tools (a 270M model offered the tool again just calls it again), the model answers
    # in text.
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    final = chat.invoke([question, answer, result])
    assert isinstance(final.content, str) and final.content.strip(), final
    assert final.response_metadata["finish_reason"] == "stop"


def test_langchain_structured_output(chat) -> None:  # noqa: ANN001
    from pydantic import BaseModel

    class Capital(BaseModel):
        country: str
        city: str

    structured = chat.with_structured_output(Capital, method="json_schema")
    capital = structured.invoke("What is the capital of Japan?")
    assert isinstance(capital, Capital)


# aider: a one-shot edit through litellm's OpenAI provider.

@pytest.fixture(scope="module")
def aider() -> Path:
    if not (3, 10) <= sys.version_info[:2] <= (3, 12):
        _missing(f"{AIDER} supports Python 3.10-3.12, this is {sys.version.split()[0]}")
    return python_client("aider", AIDER, executable="aider")


@pytest.mark.timeout(1200)  # the first run installs aider-chat (about a minute)
def test_aider_one_shot(aider: Path, server: LiveServer, key: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "greet.py").write_text('def greet(name):\n    return "Hello " + name\n')
    before = last_usage_id(server)
    env = client_env(tmp_path / "home", OPENAI_API_BASE=f"{server.base_url}/v1",
                     OPENAI_API_KEY=key, LITELLM_LOCAL_MODEL_COST_MAP="True")
    result = run([aider, "--model", f"openai/{MODEL}", "--message",
                  "Add a docstring to greet.", "--yes-always", "--no-git", "--no-check-update",
                  "--no-show-model-warnings", "--no-analytics", "--no-pretty",
                  "greet.py"], env=env, cwd=project, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for symptom in ("APIError", "BadRequestError", "APIConnectionError", "litellm.", "Traceback"):
        assert symptom not in output, output
    rows = usage_since(server, before)
    assert rows and all(r.status == "ok" and r.endpoint == "chat.completions" for r in rows), rows
    assert rows[0].completion_tokens > 0


# Claude Code: `claude -p` through Serai's Anthropic Messages API.

@pytest.fixture(scope="module")
def claude() -> Path:
    return npm_client("claude-code", CLAUDE_CODE, executable="claude")


# Reading Claude Code's 11.5k-token prompt takes 2-4 minutes on 2 busy cores.
@pytest.mark.timeout(1800)
def test_claude_code_print_mode(claude: Path, server: LiveServer, key: str,
                                tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    before = last_usage_id(server)
    env = client_env(
        tmp_path / "home",
        ANTHROPIC_BASE_URL=server.base_url, ANTHROPIC_API_KEY=key,
        ANTHROPIC_MODEL=MODEL, ANTHROPIC_SMALL_FAST_MODEL=MODEL,
        ANTHROPIC_DEFAULT_HAIKU_MODEL=MODEL, ANTHROPIC_DEFAULT_SONNET_MODEL=MODEL,
        ANTHROPIC_DEFAULT_OPUS_MODEL=MODEL,
        # The model writes about 6 tokens/s behind an 11.5k-token prompt on 2 cores; when it rambles
        # Claude Code asks it to resume three times, so the cap bounds the test to minutes.
        CLAUDE_CODE_MAX_OUTPUT_TOKENS="128",
        CLAUDE_CODE_MAX_RETRIES="0", API_TIMEOUT_MS="900000",
        DISABLE_TELEMETRY="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    log_mark = len(server.log())
    result = run([claude, "-p", "What is the capital of Japan? Answer in one word.",
                  "--max-turns", "1", "--output-format", "stream-json", "--verbose"],
                 env=env, cwd=project, timeout=1500)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert events and events[-1]["type"] == "result", result.stdout + result.stderr
    final = events[-1]

    # Serai answered every request Claude Code made with 200: Claude Code falls back silently
    # on some 400s (it drops what was refused and asks again), so its exit code cannot tell.
    logged = [json.loads(line) for line in server.log()[log_mark:].splitlines()
              if line.startswith("{")]  # the server logs JSON lines (stderr is a file)
    answered = [(line["path"], line["status"]) for line in logged
                if line["logger"] == "serai.requests" and line["path"].startswith("/v1/")]
    assert answered and all(status == 200 for _, status in answered), answered
    assert final.get("api_error_status") is None, final

    # The model's streamed text reached Claude Code as an assistant message.
    replies = [block["text"] for event in events if event["type"] == "assistant"
               for block in event["message"]["content"] if block["type"] == "text"]
    assert replies and replies[0].strip(), events
    # Sampled at temperature 1 (Claude Code sends none), the 270M model sometimes runs past the
    # output cap (Claude Code asks it to resume three times, then reports max_output_tokens) or
    # writes a tool call that --max-turns 1 leaves unanswered: limits of the model, not of
    # the protocol. Anything else is a failure.
    if final["is_error"] or final["subtype"] != "success":
        assert (final.get("api_error") == "max_output_tokens"
                or final["subtype"] == "error_max_turns"), final
    else:
        assert result.returncode == 0 and final["result"].strip(), final

    rows = usage_since(server, before)
    assert rows and all(r.status == "ok" and r.endpoint == "messages" for r in rows), rows
    # Claude Code's system prompt and its tools (about 11,500 tokens) reached the model whole.
    assert rows[0].prompt_tokens > 8000
