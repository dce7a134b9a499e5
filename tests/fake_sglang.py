"""A test stand-in for an SGLang inference server that speaks SGLang's OpenAI-compatible API.

SGLang needs a GPU, so tests and benchmarks of the rollout client and the reward code talk to
this fake instead. It serves the same wire format on loopback (``/health``, ``/v1/models``, ``/get_model_info``,
``/v1/chat/completions``, ``/v1/completions`` and SGLang's native ``/generate`` with
``input_ids``) and answers every generate request with the output of a *policy*: a plain
function of the conversation so far that scripts what the assistant says next. ``/generate``
needs the model's ``tokenizer``: it decodes the ids, and encodes the reply into ``output_ids``
(ending with the end-of-turn id when the turn finished on its own, as SGLang's do). Both APIs hand the policy the same :class:`Conversation`; for
``/v1/completions`` the raw ChatML prompt is parsed back into turns (tool results, which chat
templates render as ``<tool_response>`` user turns, become ``tool`` turns again).

What it models and what it does not:

* Tokens are whitespace-separated words. A reply longer than ``max_tokens`` is cut to
  ``max_tokens`` words with ``finish_reason: "length"``; ``stop`` strings cut the reply before
  the first match, as SGLang does by default.
* ``n`` must be 1 and streaming is not supported; ``tool_calls`` in chat replies are always
  null (as with SGLang started without a tool-call parser): tool calls stay in the text.
* :class:`Faults` adds latency, failing requests and hangs; ``requests``, ``in_flight``,
  ``max_in_flight`` and ``generate_calls`` record what the server saw.

Usage::

    fake = FakeSGLang(SearchThenAnswer({"Where is X?": ["Ravenport"]}), model="solver")
    with fake.serve() as base_url:          # http://127.0.0.1:PORT
        ...                                  # point the client at base_url

Policies run on the server's event loop: keep them quick (they may also be ``async``).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Literal

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QUESTION_MARKER = "Question:"


# -- what a policy sees and says ----------------------------------------------------------------


@dataclass
class Turn:
    role: str       # "system", "user", "assistant" or "tool" (a <tool_response> body, tags stripped)
    content: str


@dataclass
class Conversation:
    turns: list[Turn]
    api: str                                   # "chat" or "completions"
    request: dict                              # the raw JSON body
    tools: list[dict] = field(default_factory=list)  # chat: request["tools"]; completions: the <tools> block
    prefill: str = ""                          # completions: text already after the generation prompt

    @property
    def question(self) -> str | None:
        """The text after the last ``Question:`` in the first user turn, stripped."""
        first_user = next((turn.content for turn in self.turns if turn.role == "user"), None)
        return _after_question_marker(first_user)

    @property
    def last_user_turn(self) -> str | None:
        return next((turn.content for turn in reversed(self.turns) if turn.role == "user"), None)

    @property
    def assistant_turns(self) -> list[str]:
        return [turn.content for turn in self.turns if turn.role == "assistant"]

    @property
    def tool_responses(self) -> list[str]:
        return [turn.content for turn in self.turns if turn.role == "tool"]


@dataclass
class Reply:
    text: str
    finish_reason: str = "stop"


Policy = Callable[[Conversation], "Reply | str | Awaitable[Reply | str]"]


@dataclass
class Faults:
    latency_s: float = 0.0   # every generate request sleeps this long before answering
    fail_first: int = 0      # the first N generate requests answer `fail_status`
    fail_status: int = 500
    fail_every: int = 0      # if > 0, every k-th generate request answers `fail_status`
    hang_s: float = 0.0      # if > 0, generate requests sleep this long too (to trigger client timeouts)

    def fails(self, number: int) -> bool:
        """Whether the generate request with this 1-based arrival number gets an injected failure."""
        return number <= self.fail_first or (self.fail_every > 0 and number % self.fail_every == 0)


def _after_question_marker(text: str | None) -> str | None:
    if text is None:
        return None
    _, marker, question = text.rpartition(QUESTION_MARKER)
    return question.strip() if marker else None


# -- ChatML --------------------------------------------------------------------------------------

_TOOL_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.DOTALL)
_TOOLS_BLOCK = re.compile(r"<tools>(.*?)</tools>", re.DOTALL)
_ROLES = ("system", "user", "assistant", "tool")


def parse_chatml(prompt: str) -> tuple[list[Turn], str]:
    """The turns of a ChatML prompt, and the text of a trailing open assistant turn.

    ``<|im_start|>role\\ncontent<|im_end|>\\n`` is one turn. A user turn made only of
    ``<tool_response>`` blocks becomes one ``tool`` turn per block. The prompt normally ends with
    the generation prompt ``<|im_start|>assistant\\n``, whose (usually empty) text is returned as
    the prefill. Text without any ChatML marker is taken as a single user turn.
    """
    if IM_START not in prompt:
        return [Turn("user", prompt)], ""
    turns: list[Turn] = []
    pieces = prompt.split(IM_START)[1:]
    for number, piece in enumerate(pieces, 1):
        role, _, rest = piece.partition("\n")
        role = role.strip()
        if role not in _ROLES:
            raise ValueError(f"turn {number} has role {role!r}; expected one of {', '.join(_ROLES)}")
        content, closed, _ = rest.partition(IM_END)
        if not closed:
            if number == len(pieces) and role == "assistant":
                return turns, content
            raise ValueError(f"turn {number} ({role}) is not closed by {IM_END}")
        turns.extend(_chatml_turns(role, content))
    return turns, ""


def _chatml_turns(role: str, content: str) -> list[Turn]:
    if role == "user":
        bodies = _TOOL_RESPONSE.findall(content)
        if bodies and not _TOOL_RESPONSE.sub("", content).strip():
            return [Turn("tool", body) for body in bodies]
    return [Turn(role, content)]


def parse_tools_block(system: str) -> list[dict]:
    """Tool schemas from the last ``<tools>…</tools>`` block of a system turn (one JSON per line, or a list)."""
    blocks = [block.strip() for block in _TOOLS_BLOCK.findall(system) if block.strip()]
    if not blocks:
        return []
    try:
        parsed = json.loads(blocks[-1])
        return parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        return [json.loads(line) for line in blocks[-1].splitlines() if line.strip()]


# -- request bodies ------------------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _Generate(BaseModel):
    model_config = ConfigDict(extra="allow")   # SGLang takes many more sampling options
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False


class _ChatRequest(_Generate):
    messages: list[_Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None


class _CompletionRequest(_Generate):
    prompt: str


class _NativeRequest(BaseModel):
    """SGLang's GenerateReqInput, the part verl and our client send."""

    model_config = ConfigDict(extra="allow")
    input_ids: list[int] = Field(min_length=1)
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    rid: str | None = None
    return_logprob: bool = False


def _message_text(message: _Message) -> str:
    """A chat message's text as the chat template renders it (content parts joined, tool calls appended)."""
    content = message.content
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")
    text = content or ""
    for call in message.tool_calls or []:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        text += f'\n<tool_call>\n{{"name": {json.dumps(function.get("name"))}, "arguments": {arguments}}}\n</tool_call>'
    return text


def _validation_message(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, item['loc'])) or 'body'}: {item['msg']}" for item in error.errors())


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"object": "error", "message": message, "type": _ERROR_TYPES.get(status, "APIError"),
                         "code": status}, status_code=status)


def _word_count(text: str) -> int:
    return len(text.split())


def _limit(reply: Reply, stop: str | list[str] | None, max_tokens: int | None) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) after stop strings and the max_tokens cut."""
    text, finish = reply.text, reply.finish_reason
    stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if s]
    matches = [text.find(s) for s in stops if s in text]
    if matches:
        text, finish = text[:min(matches)], "stop"
    words = list(re.finditer(r"\S+", text))
    if max_tokens is not None and len(words) > max_tokens:
        text = text[:words[max_tokens - 1].end()] if max_tokens else ""
        return text, "length", max_tokens
    return text, finish, len(words)


# -- the server ----------------------------------------------------------------------------------


class FakeSGLang:
    """An SGLang-compatible HTTP app answering with ``policy``; ``serve()`` runs it on loopback."""

    def __init__(self, policy: Policy, model: str = "solver", faults: Faults | None = None, tokenizer=None,
                 model_path: str | None = None):
        self.policy = policy
        self.tokenizer = tokenizer
        self.model = model
        self.model_path = model_path  # what /get_model_info names as the weights (SGLang: --model-path)
        self.faults = faults if faults is not None else Faults()
        self.healthy = True
        self.requests: list[dict] = []               # every generate request body (that was JSON), in arrival order
        self.conversations: list[Conversation] = []  # what the policy was shown, in call order
        self.in_flight = 0
        self.max_in_flight = 0
        self.generate_calls = 0
        self._stop: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._closing = False
        self.app = self._build_app()

    # -- HTTP --

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fake SGLang", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/health")
        async def health():
            return JSONResponse({"status": "ok"} if self.healthy else {"status": "unavailable"},
                                status_code=200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                "owned_by": "sglang"}]}

        @app.get("/get_model_info")
        async def model_info():  # SGLang's native endpoint; the keys drzero reads
            return {"model_path": self.model_path or self.model, "tokenizer_path": self.model_path or self.model,
                    "is_generation": True}

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._generate(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(request, "completions")

        @app.post("/generate")
        async def generate(request: Request):
            return await self._generate(request, "generate")

        return app

    async def _generate(self, request: Request, api: str) -> JSONResponse:
        self.generate_calls += 1
        number = self.generate_calls
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            try:
                body = await request.json()
            except ClientDisconnect:  # gone before its body arrived: nobody to answer
                return _error(400, "the client disconnected")
            except ValueError:
                body = None
            else:
                self.requests.append(body)
            faults = self.faults
            if not await self._sleep(faults.latency_s + faults.hang_s):
                return _error(503, "the server is shutting down")
            if faults.fails(number):
                return _error(faults.fail_status, f"injected fault on generate request {number}")
            if body is None:
                return _error(400, "the request body is not valid JSON")
            return await self._answer(body, api)
        finally:
            self.in_flight -= 1

    async def _answer(self, body: Any, api: str) -> JSONResponse:
        if api == "generate":
            return await self._answer_ids(body)
        schema = _ChatRequest if api == "chat" else _CompletionRequest
        try:
            parsed = schema.model_validate(body)
        except ValidationError as error:
            return _error(400, _validation_message(error))
        if parsed.model != self.model:
            return _error(404, f"The model `{parsed.model}` does not exist.")
        if parsed.n != 1:
            return _error(400, f"n={parsed.n} is not supported by the fake SGLang server (only n=1)")
        if parsed.stream:
            return _error(400, "streaming is not supported by the fake SGLang server")
        try:
            conversation = self._conversation(parsed, body, api)
        except ValueError as error:
            return _error(400, f"the fake SGLang server could not parse the ChatML prompt: {error}")

        self.conversations.append(conversation)
        try:
            reply = self.policy(conversation)
            if inspect.isawaitable(reply):
                reply = await reply
        except Exception as error:  # a policy bug must show up in the test, not kill the server
            log.exception("fake SGLang policy failed")
            return _error(500, f"policy raised {type(error).__name__}: {error}")
        reply = Reply(reply) if isinstance(reply, str) else reply
        text, finish, completion_tokens = _limit(reply, parsed.stop, parsed.max_tokens)
        prompt_tokens = sum(_word_count(turn.content) for turn in conversation.turns) if api == "chat" \
            else _word_count(parsed.prompt)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if api == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": None},
                      "finish_reason": finish}
            return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                                 "created": int(time.time()), "model": parsed.model, "choices": [choice],
                                 "usage": usage})
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                             "created": int(time.time()), "model": parsed.model, "choices": [choice], "usage": usage})

    async def _answer_ids(self, body: Any) -> JSONResponse:
        """SGLang's native /generate: token ids in, ``output_ids`` + ``meta_info`` out."""
        try:
            parsed = _NativeRequest.model_validate(body)
        except ValidationError as error:
            return _error(400, _validation_message(error))
        if self.tokenizer is None:
            return _error(500, "the fake SGLang server was started without a tokenizer; /generate needs one")
        prompt = self.tokenizer.decode(parsed.input_ids, skip_special_tokens=False)
        try:
            turns, prefill = parse_chatml(prompt)
        except ValueError as error:
            return _error(400, f"the fake SGLang server could not parse the ChatML prompt: {error}")
        system = next((turn.content for turn in turns if turn.role == "system"), "")
        conversation = Conversation(turns=turns, api="generate", request=body, tools=parse_tools_block(system),
                                    prefill=prefill)
        self.conversations.append(conversation)
        try:
            reply = self.policy(conversation)
            if inspect.isawaitable(reply):
                reply = await reply
        except Exception as error:
            log.exception("fake SGLang policy failed")
            return _error(500, f"policy raised {type(error).__name__}: {error}")
        reply = Reply(reply) if isinstance(reply, str) else reply
        limit = int(parsed.sampling_params.get("max_new_tokens", 128))
        ids = self.tokenizer(reply.text, add_special_tokens=False)["input_ids"]
        if reply.finish_reason == "stop":
            ids = ids + [self.tokenizer.convert_tokens_to_ids(IM_END)]
        finish = {"type": "stop", "matched": ids[-1]} if reply.finish_reason == "stop" else \
            {"type": "length", "length": limit}
        if len(ids) > limit:
            ids, finish = ids[:limit], {"type": "length", "length": limit}
        return JSONResponse({"text": self.tokenizer.decode(ids, skip_special_tokens=True), "output_ids": ids,
                             "meta_info": {"id": uuid.uuid4().hex, "finish_reason": finish,
                                           "prompt_tokens": len(parsed.input_ids), "completion_tokens": len(ids),
                                           "cached_tokens": 0}})

    @staticmethod
    def _conversation(parsed: _Generate, body: dict, api: str) -> Conversation:
        if isinstance(parsed, _ChatRequest):
            turns = [Turn(message.role, _message_text(message)) for message in parsed.messages]
            return Conversation(turns=turns, api=api, request=body, tools=list(parsed.tools or []))
        turns, prefill = parse_chatml(parsed.prompt)
        system = next((turn.content for turn in turns if turn.role == "system"), "")
        return Conversation(turns=turns, api=api, request=body, tools=parse_tools_block(system), prefill=prefill)

    # -- sleeping that shutdown can cut short --

    def _stopping(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._stop is None or self._stop[0] is not loop:
            self._stop = (loop, asyncio.Event())
        if self._closing:
            self._stop[1].set()
        return self._stop[1]

    async def _sleep(self, seconds: float) -> bool:
        """Sleep ``seconds``; False if serve() began shutting down first."""
        if seconds <= 0:
            return True
        stopping = self._stopping()
        if stopping.is_set():
            return False
        try:
            await asyncio.wait_for(stopping.wait(), seconds)
        except asyncio.TimeoutError:
            return True
        return False

    def _wake_sleepers(self) -> None:
        self._closing = True
        stop = self._stop
        if stop is not None:
            loop, event = stop
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is already closed
                pass

    # -- serving --

    @contextmanager
    def serve(self, startup_timeout: float = 10.0) -> Iterator[str]:
        """Serve the app on a free 127.0.0.1 port in a background thread; yields the base URL.

        Returns once ``/health`` answers (whatever ``healthy`` says). On exit, requests still
        sleeping (latency, hangs) are answered 503 at once and the server stops within ~0.3 s.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        base_url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                access_log=False, timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        crashed: list[BaseException] = []

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as error:  # reported by the startup wait below
                crashed.append(error)

        self._stop, self._closing = None, False
        thread = threading.Thread(target=run, name=f"fake-sglang-{port}", daemon=True)
        thread.start()
        try:
            self._wait_until_answering(base_url, server, thread, crashed, startup_timeout)
            yield base_url
        finally:
            self._wake_sleepers()
            server.should_exit = True
            thread.join(timeout=3)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout=5)
            sock.close()

    @staticmethod
    def _wait_until_answering(base_url: str, server: uvicorn.Server, thread: threading.Thread,
                              crashed: list[BaseException], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while True:
                if not thread.is_alive():
                    raise RuntimeError(f"fake SGLang server stopped during startup: {crashed[:1]!r}")
                if server.started:
                    try:
                        client.get(f"{base_url}/health")
                        return
                    except httpx.TransportError:
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fake SGLang server at {base_url} did not answer within {timeout}s")
                time.sleep(0.005)


# -- ready-made policies -------------------------------------------------------------------------


def search_call(query: str) -> str:
    """An assistant turn that thinks once and calls the search tool with one query."""
    call = json.dumps({"name": "search", "arguments": {"query_list": [query]}}, ensure_ascii=False)
    return f"<think>I should search for this.</think>\n<tool_call>{call}</tool_call>"


class SearchThenAnswer:
    """Search ``searches`` times, then answer; answers cycle through ``answers[question]`` (or ``default``).

    The per-question counter advances each time an answer is emitted, so n probes of one
    question get the first n answers of its cycle between them.
    """

    def __init__(self, answers: dict[str, list[str]], default: list[str] | None = None, searches: int = 1):
        self.answers = {question: list(cycle) for question, cycle in answers.items()}
        self.default = list(default) if default is not None else None
        self.searches = searches
        self.emitted: dict[str, int] = {}   # answers given so far, per question
        self._lock = threading.Lock()

    def __call__(self, conversation: Conversation) -> Reply:
        question = conversation.question
        if question is None or _after_question_marker(conversation.last_user_turn) is None:
            return Reply("<answer>unknown</answer>")
        if len(conversation.tool_responses) < self.searches:
            return Reply(search_call(question))
        cycle = self.answers.get(question, self.default)
        if not cycle:
            return Reply("<answer>unknown</answer>")
        with self._lock:
            index = self.emitted.get(question, 0)
            self.emitted[question] = index + 1
        return Reply(f"<think>The results answer it.</think>\n<answer>{cycle[index % len(cycle)]}</answer>")


def never_answers(conversation: Conversation) -> Reply:
    """A model that searches forever."""
    return Reply(search_call(conversation.question or "more information"))


RAMBLE_WORDS = 5000
_RAMBLE = ("<think>" + " ".join(itertools.islice(itertools.cycle(
    "Let me think about this once more and weigh every possibility before I decide anything".split()),
    RAMBLE_WORDS)))


def rambles(conversation: Conversation) -> Reply:
    """5,000 words of ``<think>`` text that never closes: something for max_tokens to cut."""
    return Reply(_RAMBLE)


MALFORMED_TOOL_CALL = '<tool_call>{"name": "search", "arguments": {query_list: [oops</tool_call>'


def malformed_tool_call(conversation: Conversation) -> Reply:
    """A tool call that is not JSON on the first turn, then the answer ``x``."""
    return Reply("<answer>x</answer>" if conversation.assistant_turns else MALFORMED_TOOL_CALL)
