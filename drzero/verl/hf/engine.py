"""The `hf` inference engine: token-in, token-out generation with ``transformers`` on the training model.

    engine = HFEngine(model, limits=ResponseLimits(prompt_length=1536, response_length=2560, max_model_len=8192),
                      stop_token_ids=[eos_id], pad_token_id=pad_id)
    out = await engine.generate([1, 2, 3], {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": False})

It answers the call verl 0.7.1's agent loop makes on a rollout server (``server.generate(prompt_ids,
sampling_params)``) the way SGLang's server answers it, so that ``--engine hf`` changes speed, not
behaviour:

* **token limit** — verl sends no limit; SGLang's server applies
  ``min(response_length, prompt_length + response_length - len(prompt))``, clamped to
  ``[0, max_model_len - len(prompt)]`` (``verl/workers/rollout/sglang_rollout/async_sglang_server.py``
  ``generate``). ``max_new_tokens`` / ``max_tokens`` in the request win, as they do there.
* **turn limit** (hf only, off by default) — ``actor_rollout_ref.rollout.custom.hf_max_new_tokens`` caps every
  call, so that one sample that never emits its stop token costs that many decode steps of its batch instead of
  the whole response budget (``model.generate`` runs until its last row stops). The capped turn ends with stop
  reason "length", as the budget would have ended it; benchmarks/learning_curve.py sets it.
* **stop** — generation ends at the first stop token (the model's EOS ids); the stop token is part of the
  output and nothing follows it (``transformers`` pads finished rows, we cut them).
* **sampling** — ``temperature`` 0 is greedy; ``top_k`` -1 (verl's default) means no top-k;
  ``top_p`` and ``repetition_penalty`` pass through. ``logprobs`` true returns the log-probability of
  each output token under the model (before temperature), else ``None``.

Concurrent requests are batched: ``generate`` queues a request, a collector task waits a few
milliseconds for more, groups them by sampling parameters, and runs one left-padded
``model.generate`` per group in a worker thread, so the event loop keeps taking requests. Slow next to
SGLang (no paged KV cache, no continuous batching): it exists for debugging on any GPU and for tests.
The verl wiring (worker, replica) is in ``drzero.verl.hf.worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

TURN_LIMIT_KEY = "hf_max_new_tokens"   # actor_rollout_ref.rollout.custom.<this>: the turn limit below
BATCH_WAIT_S = 0.01   # how long the collector waits for more requests before generating
MAX_BATCH = 64        # rows per model.generate call: bounds the KV cache of one call


@dataclass(frozen=True)
class ResponseLimits:
    """The token budgets SGLang's server enforces for verl (RolloutConfig's prompt/response length)."""

    prompt_length: int
    response_length: int
    max_model_len: int
    turn_limit: int | None = None   # rollout.custom.hf_max_new_tokens: a cap on every call (hf only)

    def max_new_tokens(self, prompt_len: int, requested: int | None = None) -> int:
        """New tokens allowed after a prompt of ``prompt_len`` tokens, as SGLang's verl server computes it,
        then at most ``turn_limit``."""
        room = self.max_model_len - prompt_len
        if room < 0:
            raise ValueError(f"prompt length ({prompt_len}) exceeds the model's maximum context length "
                             f"({self.max_model_len}); shorten the prompt or raise rollout.max_model_len")
        if requested is None:
            requested = min(self.response_length, self.prompt_length + self.response_length - prompt_len)
        if self.turn_limit:
            requested = min(int(requested), self.turn_limit)
        return max(0, min(int(requested), room))


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters one ``model.generate`` call can share."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    logprobs: bool = False

    @classmethod
    def from_request(cls, params: dict[str, Any]) -> tuple["Sampling", int | None]:
        """(shared parameters, the request's own token limit or None) from verl's sampling_params dict."""
        params = dict(params)
        limit = params.pop("max_new_tokens", None)
        if limit is None:
            limit = params.pop("max_tokens", None)
        known = {k: params.pop(k) for k in ("temperature", "top_p", "top_k", "repetition_penalty", "logprobs")
                 if k in params and params[k] is not None}
        unknown = sorted(k for k, v in params.items() if v is not None)
        if unknown:
            log.warning("hf engine ignores sampling parameters %s (SGLang would honour them)", unknown)
        sampling = cls(**known)
        if sampling.temperature < 0:
            raise ValueError(f"sampling_params temperature={sampling.temperature} is negative; expected >= 0 "
                             "(0 means greedy)")
        if not 0 < sampling.top_p <= 1:
            raise ValueError(f"sampling_params top_p={sampling.top_p} is out of range; expected 0 < top_p <= 1")
        return sampling, limit

    def generate_kwargs(self) -> dict[str, Any]:
        """Fields of ``transformers.GenerationConfig``: greedy at temperature 0, top_k -1 = no top-k."""
        # A fresh GenerationConfig per call (not the model's): Qwen ships top_k=20, top_p=0.8 and
        # repetition_penalty=1.05 in generation_config.json, which SGLang under verl does not apply.
        if self.temperature == 0:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k if self.top_k > 0 else 0, "repetition_penalty": self.repetition_penalty}


@dataclass
class Generation:
    """One request's answer: the new tokens (stop token included), their log-probs, why it stopped."""

    token_ids: list[int]
    log_probs: list[float] | None
    stop_reason: str            # SGLang's finish reasons: "stop" (a stop token) or "length"


def cut_at_stop(row: Iterable[int], stop_token_ids: set[int], limit: int) -> tuple[list[int], str]:
    """The first ``limit`` tokens of ``row`` up to and including the first stop token."""
    out: list[int] = []
    for token in row:
        if len(out) >= limit:
            break
        out.append(int(token))
        if token in stop_token_ids:
            return out, "stop"
    return out, "length"


@dataclass
class _Request:
    prompt_ids: list[int]
    limit: int
    future: asyncio.Future = field(repr=False)


class HFEngine:
    """Batched ``transformers`` generation on ``module`` (an HF causal LM, or an FSDP1 wrapper of one)."""

    def __init__(self, module, *, limits: ResponseLimits, stop_token_ids: Iterable[int], pad_token_id: int,
                 max_batch: int = MAX_BATCH, batch_wait_s: float = BATCH_WAIT_S,
                 autocast_dtype=None, params_context: Callable[[], Any] | None = None):
        stop = {int(t) for t in stop_token_ids if t is not None}
        if not stop:
            raise ValueError("the hf engine needs at least one stop token id (the model's EOS); got none. "
                             "Set eos_token_id in the model's generation_config.json or the tokenizer")
        self.module = module
        self.limits = limits
        self.stop_token_ids = stop
        self.pad_token_id = int(pad_token_id)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.autocast_dtype = autocast_dtype
        self.params_context = params_context or contextlib.nullcontext
        self._queue: asyncio.Queue | None = None
        self._collector: asyncio.Task | None = None
        self.calls = 0          # model.generate calls so far (tests and the smoke read it)

    @property
    def model(self):
        """The HF model inside an FSDP1 wrapper (FSDP2 keeps the HF model as the module)."""
        return getattr(self.module, "_fsdp_wrapped_module", self.module)

    # -- the async front: verl's server.generate -------------------------------------------------------
    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> Generation:
        sampling, requested = Sampling.from_request(sampling_params)
        limit = self.limits.max_new_tokens(len(prompt_ids), requested)
        if limit == 0:
            return Generation([], [] if sampling.logprobs else None, "length")
        if self._queue is None or self._collector is None or self._collector.done():
            self._queue = asyncio.Queue()
            self._collector = asyncio.get_running_loop().create_task(self._collect())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((sampling, _Request(list(prompt_ids), limit, future)))
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            await asyncio.sleep(self.batch_wait_s)
            pending = [first]
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            groups: dict[Sampling, list[_Request]] = {}
            for sampling, request in pending:
                groups.setdefault(sampling, []).append(request)
            for sampling, requests in groups.items():
                for start in range(0, len(requests), self.max_batch):
                    chunk = requests[start:start + self.max_batch]
                    try:
                        results = await loop.run_in_executor(
                            None, self.generate_batch, [r.prompt_ids for r in chunk], sampling,
                            [r.limit for r in chunk])
                    except Exception as error:  # every waiting request learns why
                        for r in chunk:
                            if not r.future.done():
                                r.future.set_exception(error)
                        continue
                    for r, result in zip(chunk, results):
                        if not r.future.done():
                            r.future.set_result(result)

    # -- the sync core ------------------------------------------------------------------------------------
    def generate_batch(self, prompts: list[list[int]], sampling: Sampling, limits: list[int]) -> list[Generation]:
        """One left-padded ``model.generate`` over ``prompts``; each row cut to its own limit and first stop."""
        import torch
        from transformers import GenerationConfig

        model = self.model
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        was_training = self.module.training
        self.module.eval()
        autocast = (torch.autocast(device_type=device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        try:
            with torch.no_grad(), self.params_context(), autocast:
                config = GenerationConfig(
                    max_new_tokens=max(limits), eos_token_id=sorted(self.stop_token_ids),
                    pad_token_id=self.pad_token_id, use_cache=True, return_dict_in_generate=True,
                    output_logits=sampling.logprobs, **sampling.generate_kwargs())
                output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                        generation_config=config)
        finally:
            if was_training:
                self.module.train()
        self.calls += 1
        new_tokens = output.sequences[:, width:].tolist()
        logprobs = None
        if sampling.logprobs:
            steps = torch.stack(output.logits, dim=1).float()                      # (batch, new, vocab)
            picked = torch.log_softmax(steps, dim=-1).gather(-1, output.sequences[:, width:, None])
            logprobs = picked.squeeze(-1).tolist()
        results = []
        for row, (tokens, limit) in enumerate(zip(new_tokens, limits)):
            kept, reason = cut_at_stop(tokens, self.stop_token_ids, limit)
            results.append(Generation(kept, logprobs[row][:len(kept)] if logprobs is not None else None, reason))
        return results


def stop_token_ids_of(model, tokenizer) -> list[int]:
    """The EOS ids SGLang stops at: the model's generation config (int or list), the config, the tokenizer."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids += list(value) if isinstance(value, (list, tuple)) else [value]
    return sorted({int(i) for i in ids})
