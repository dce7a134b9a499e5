"""Multi-turn search-agent rollouts against an SGLang server's OpenAI-compatible API.

One client serves three jobs: the proposer reward's solver probes, gen-data (sampling the
proposer) and evaluation. A rollout renders the chat, generates one assistant turn, parses its
``<tool_call>``s, runs the searches, appends the results as tool turns and goes on until the
model answers, stops without a call, or hits the turn or token limit. Every HTTP request to the
server passes one shared concurrency bound and is retried with backoff on 5xx, timeouts and
connection errors; a rollout that still fails ends with ``stop_reason="error"`` and a reason,
it never raises into the caller.

Two wire formats. ``api="generate"`` (the default) is verl 0.7.1's own: token ids in, token ids
out, through SGLang's native ``/generate``. The prompt is rendered by ``drzero.rollout.render``
exactly as verl renders it (the model's chat template, verl's tool schema, the configured
``chat_template_kwargs`` such as Qwen3's ``enable_thinking``); tool results are cut to the same
``max_tool_response_length`` and appended as the same tokens; and the same limits end a rollout:
``max_new_tokens = min(response, prompt + response - context)`` per turn, the episode ends when
the response reaches ``max_response_tokens`` *counting tool tokens*, or when the next tool result
would not fit (``stop_reason="budget"``). So a probe measures the solver that training trains.
``api="chat"`` sends messages to ``/v1/chat/completions`` and lets the server apply its own
template (tools rendered SGLang's way, tool text free); it is kept for servers that offer
nothing else and does not match training.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from drzero.prompts import SEARCH_TOOL_SCHEMA, ToolCall, last_tag, parse_tool_call, parse_tool_calls
from drzero.rollout.http import RetriesExhausted, post_with_retries
from drzero.rollout.render import ChatRenderer, ToolOutputLimit, verl_tool_schemas
from drzero.rollout.search import SearchSettings, search

APIS = ("generate", "chat")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    base_url: str
    model: str
    api: str = "generate"             # "generate" (SGLang /generate, token ids, as verl) or "chat"
    temperature: float = 1.0
    top_p: float = 1.0
    max_turns: int = 5                # assistant turns; Dr. Zero: 5 (<= 4 searches and an answer)
    max_response_tokens: int = 2560   # verl's data.max_response_length: model AND tool tokens ("generate")
    max_prompt_tokens: int = 512      # verl's data.max_prompt_length; the context is prompt + response
    tool_output: ToolOutputLimit = field(default_factory=ToolOutputLimit)  # verl's max_tool_response_length
    chat_template_kwargs: tuple = ()  # (key, value) pairs, e.g. (("enable_thinking", False),)
    timeout: float = 300.0
    retries: int = 4
    backoff: float = 1.0
    concurrency: int = 64             # generate requests in flight at once, across all rollouts

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api={self.api!r} is not valid: expected one of {APIS}")
        if isinstance(self.chat_template_kwargs, dict):  # accept a dict; keep the settings hashable
            object.__setattr__(self, "chat_template_kwargs", tuple(sorted(self.chat_template_kwargs.items())))


@dataclass
class Trajectory:
    messages: list[dict]
    assistant_turns: list[str] = field(default_factory=list)
    tool_calls: int = 0
    valid_tool_calls: int = 0
    search_failures: int = 0
    final_answer: str | None = None
    stop_reason: str = "running"      # answer | no_tool_call | max_turns | max_tokens | budget | error
    error: str | None = None
    response_tokens: int = 0          # "generate": model and tool tokens, as verl counts them
    response_text: str | None = None  # "generate": the response as verl decodes it for the reward
    seconds: float = 0.0

    @property
    def completed(self) -> bool:
        """The rollout ran to an end of its own (not a server or search-infrastructure failure)."""
        return self.stop_reason != "error"

    @property
    def budget_cut(self) -> bool:
        """Ended by the response budget: the response filled it, or the next tool result did not fit."""
        return self.stop_reason in ("budget", "max_tokens")


class GenerationError(RuntimeError):
    pass


class AgentRolloutClient:
    def __init__(self, generation: GenerationSettings, search_settings: SearchSettings, tokenizer=None,
                 tools: list[dict] | None = None):
        self.generation = generation
        self.search_settings = search_settings
        self.tokenizer = tokenizer
        self.renderer = None
        if generation.api == "generate":
            if tokenizer is None:
                raise ValueError("api='generate' renders prompts as verl does and needs the model's tokenizer")
            self.renderer = ChatRenderer(tokenizer, tools if tools is not None else verl_tool_schemas(),
                                         dict(generation.chat_template_kwargs))
        self.tools = tools if tools is not None else [SEARCH_TOOL_SCHEMA]
        self._semaphore: asyncio.Semaphore | None = None
        self._admission: asyncio.Semaphore | None = None
        self._http = None
        self._loop = None

    # -- plumbing ------------------------------------------------------------------------------

    def _bind(self):
        """HTTP session and semaphore belong to the running loop; make them on first use in it.

        aiohttp, not httpx: with hundreds of requests in flight over kept-alive connections,
        httpx's pool costs several times the server's own latency in client CPU
        (benchmarks/reward_probes.py measured 3.4x the ideal wall time; aiohttp stays within 1.15x).
        """
        import aiohttp  # ~0.15 s to import: on first use, not when `drzero --help` imports this module

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            limit = self.generation.concurrency
            # trust_env stays False (aiohttp's default): proxy variables must not capture localhost calls.
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                               timeout=aiohttp.ClientTimeout(total=self.generation.timeout))
            self._semaphore = asyncio.Semaphore(limit)
            # Admit at most 2x as many rollouts as requests in flight: enough to keep the server
            # busy while some rollouts search, few enough that memory does not grow with the
            # number of rollouts queued (a plain gather would start them all breadth-first).
            self._admission = asyncio.Semaphore(2 * limit)
            self._loop = loop
        return self._http, self._semaphore

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http, self._loop = None, None

    async def _post(self, path: str, body: dict) -> dict:
        http, semaphore = self._bind()
        settings = self.generation
        try:
            status, text = await post_with_retries(http, settings.base_url.rstrip("/") + path, body,
                                                   retries=settings.retries, backoff=settings.backoff,
                                                   timeout=settings.timeout, what="inference server",
                                                   limiter=semaphore)
        except RetriesExhausted as failure:
            raise GenerationError(str(failure)) from None
        if status != 200:
            raise GenerationError(f"inference server rejected the request ({status}): {text[:300]}")
        try:
            return json.loads(text)
        except ValueError:
            raise GenerationError(f"inference server sent a body that is not JSON: {text[:200]!r}") from None

    async def _generate(self, messages: list[dict], max_tokens: int) -> tuple[str, list[ToolCall], str, int]:
        """One assistant turn over the chat API: (text, tool calls the server parsed, finish reason, tokens)."""
        settings = self.generation
        reply = await self._post("/v1/chat/completions", {
            "model": settings.model, "temperature": settings.temperature, "top_p": settings.top_p,
            "max_tokens": max_tokens, "messages": messages, "tools": self.tools,
            **({"chat_template_kwargs": dict(settings.chat_template_kwargs)} if settings.chat_template_kwargs else {})})
        choice = reply["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") or ""
        server_calls = [_server_tool_call(call) for call in message.get("tool_calls") or []]
        tokens = (reply.get("usage") or {}).get("completion_tokens") or len(text.split())
        return text, server_calls, choice.get("finish_reason") or "stop", int(tokens)

    async def _generate_ids(self, context: list[int], max_new_tokens: int) -> tuple[list[int], str]:
        """One assistant turn over SGLang's /generate: (output token ids, finish reason type)."""
        settings = self.generation
        reply = await self._post("/generate", {
            "input_ids": context,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": settings.temperature,
                                "top_p": settings.top_p}})
        output_ids = reply.get("output_ids")
        if not isinstance(output_ids, list):
            raise GenerationError("inference server answered /generate without 'output_ids'; is it SGLang?")
        finish = (reply.get("meta_info") or {}).get("finish_reason") or {}
        reason = finish.get("type") if isinstance(finish, dict) else str(finish)
        return [int(t) for t in output_ids], reason or "stop"

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, messages: list[dict]) -> Trajectory:
        """Roll out one conversation; never raises for server or search failures."""
        self._bind()
        async with self._admission:
            if self.generation.api == "generate":
                return await self._run_tokens(messages)
            return await self._run_admitted(messages)

    async def _run_tokens(self, messages: list[dict]) -> Trajectory:
        """verl 0.7.1's ToolAgentLoop, over HTTP: token ids in and out, the same limits, the same stops."""
        started = time.perf_counter()
        settings, renderer = self.generation, self.renderer
        trajectory = Trajectory(messages=[dict(m) for m in messages])
        prompt_length, response_length = settings.max_prompt_tokens, settings.max_response_tokens
        context = renderer.prompt_ids(trajectory.messages)
        prompt_size = len(context)
        try:
            if prompt_size > prompt_length:
                # verl's dataset drops such a row (filter_overlong_prompts): it never reaches training
                raise GenerationError(f"the prompt renders to {prompt_size} tokens, over max_prompt_tokens="
                                      f"{prompt_length}")
            for turn in range(settings.max_turns):
                max_new = min(response_length, prompt_length + response_length - len(context))
                if max_new <= 0:
                    trajectory.stop_reason = "max_tokens"
                    break
                output_ids, finish = await self._generate_ids(context, max_new)
                context += output_ids
                text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
                trajectory.assistant_turns.append(text)
                trajectory.messages.append({"role": "assistant", "content": text})
                if len(context) - prompt_size >= response_length:
                    trajectory.stop_reason = "max_tokens"
                    break
                if turn + 1 >= settings.max_turns:  # verl checks the turn cap before it parses tool calls
                    trajectory.stop_reason = "max_turns"
                    break
                # verl's hermes parser drops a call that is not JSON; with no call left the episode ends
                calls = [c for c in parse_tool_calls(text) if not c.error or not c.error.startswith("tool call is")]
                if not calls:
                    trajectory.stop_reason = "answer" if last_tag(text, "answer") is not None else "no_tool_call"
                    break
                texts = await self._run_tools(calls, trajectory, settings.tool_output)
                tool_ids = renderer.tool_turn_ids(texts)
                if len(context) - prompt_size + len(tool_ids) >= response_length:
                    trajectory.stop_reason = "budget"  # verl ends the episode here: the result does not fit
                    break
                context += tool_ids
            else:
                trajectory.stop_reason = "max_turns"
        except GenerationError as failure:
            trajectory.stop_reason, trajectory.error = "error", str(failure)
            log.warning("rollout ended early: %s", failure)
        response_ids = context[prompt_size:prompt_size + response_length]
        trajectory.response_tokens = len(response_ids)
        trajectory.response_text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        if trajectory.assistant_turns:
            trajectory.final_answer = last_tag(trajectory.assistant_turns[-1], "answer")
        trajectory.seconds = time.perf_counter() - started
        return trajectory

    async def _run_admitted(self, messages: list[dict]) -> Trajectory:
        started = time.perf_counter()
        trajectory = Trajectory(messages=[dict(m) for m in messages])
        settings = self.generation
        try:
            for turn in range(settings.max_turns):
                remaining = settings.max_response_tokens - trajectory.response_tokens
                if remaining <= 0:
                    trajectory.stop_reason = "max_tokens"
                    break
                text, server_calls, finish, tokens = await self._generate(trajectory.messages, remaining)
                trajectory.response_tokens += tokens
                trajectory.assistant_turns.append(text)
                assistant = {"role": "assistant", "content": text}
                if server_calls:
                    assistant["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments":
                                                json.dumps({"query_list": c.queries})}} for c in server_calls]
                trajectory.messages.append(assistant)
                if finish == "length":
                    trajectory.stop_reason = "max_tokens"
                    break
                calls = parse_tool_calls(text) + server_calls
                if not calls:
                    trajectory.stop_reason = "answer" if last_tag(text, "answer") is not None else "no_tool_call"
                    break
                await self._run_tools(calls, trajectory)
            else:
                trajectory.stop_reason = "max_turns"
        except GenerationError as failure:
            trajectory.stop_reason, trajectory.error = "error", str(failure)
            log.warning("rollout ended early: %s", failure)
        if trajectory.assistant_turns:
            trajectory.final_answer = last_tag(trajectory.assistant_turns[-1], "answer")
        trajectory.seconds = time.perf_counter() - started
        return trajectory

    async def _run_tools(self, calls: list[ToolCall], trajectory: Trajectory,
                         limit: ToolOutputLimit | None = None) -> list[str]:
        """Run the calls, append their results (cut as verl cuts them) as tool turns; return the texts."""
        trajectory.tool_calls += len(calls)
        valid = [c for c in calls if c.valid]
        trajectory.valid_tool_calls += len(valid)
        outcomes = await asyncio.gather(*(search(c.queries, self.search_settings) for c in valid))
        results = iter(outcomes)
        texts = []
        for call in calls:
            if call.valid:
                outcome = next(results)
                trajectory.search_failures += not outcome.ok
                content = outcome.text
            else:
                content = json.dumps({"result": f"Invalid tool call: {call.error}."})
            content = limit.apply(content) if limit is not None else content
            trajectory.messages.append({"role": "tool", "content": content})
            texts.append(content)
        return texts

    async def run_many(self, conversations: list[list[dict]]) -> list[Trajectory]:
        return list(await asyncio.gather(*(self.run(m) for m in conversations)))


def _server_tool_call(call: dict) -> ToolCall:
    """A tool call the server's own parser returned, as if we had parsed it from text."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    raw = (json.dumps({"name": function.get("name"), "arguments": arguments}) if not isinstance(arguments, str)
           else f'{{"name": {json.dumps(function.get("name"))}, "arguments": {arguments}}}')
    return parse_tool_call(raw)
