"""One rendering of every prompt: the token ids verl 0.7.1's tool agent loop feeds the model.

Training (verl's ``RLHFDataset`` and ``ToolAgentLoop``), our SGLang clients (the proposer
reward's solver probes, gen-data, evaluation) and our token budgets must see the same bytes:
the same chat template, the same tool schema, the same ``chat_template_kwargs`` (Qwen3's
``enable_thinking``) and the same tool-output truncation. ``ChatRenderer`` renders them the way
verl does:

* a prompt is ``apply_chat_template(messages, tools=<schemas>, add_generation_prompt=True,
  tokenize=True, **chat_template_kwargs)``, with the schemas as verl dumps them
  (``OpenAIFunctionToolSchema.model_dump(exclude_unset=True, exclude_none=True)``);
* tool results are appended as token ids: the tool messages rendered alone (no tools, with the
  generation prompt and the kwargs), minus the system prompt a template adds to any
  conversation, which verl measures by rendering one and two empty user turns *without* the
  kwargs;

Where verl is installed its own ``verl.utils.chat_template`` functions do the rendering (they
also handle templates that refuse a conversation without a user turn), so there is nothing to
drift; the retrieval-only install falls back to the tokenizer's template directly.
* a tool result longer than ``max_tool_response_length`` characters is cut as
  ``multi_turn.tool_response_truncate_side`` says.

``tests/test_render_on_cpu.py`` checks each against verl's own functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drzero.layout import config_dir
from drzero.prompts import SEARCH_TOOL_SCHEMA

TRUNCATE_SIDES = ("left", "right", "middle")

# Thinking on: each of the solver's 5 turns gets 512 more tokens to think (drzero.data.budget); 5,632
# holds its worst case, 4 searches of <= 1,600 characters each, with the Qwen vocabulary.
THINKING_RESPONSE_LENGTH = 5632
SOLVER_PROMPT_LENGTH = 512  # Dr. Zero's solver data.max_prompt_length; probes, gen-data checks and evaluation too


def verl_tool_schemas() -> list[dict]:
    """The search tool schema exactly as verl 0.7.1 renders it (validated, then dumped without unset keys)."""
    try:
        from verl.tools.schemas import OpenAIFunctionToolSchema  # verl: slow to import
    except ImportError:  # the retrieval-only install has no verl; our schema round-trips unchanged
        return [SEARCH_TOOL_SCHEMA]
    schema = OpenAIFunctionToolSchema.model_validate(SEARCH_TOOL_SCHEMA)
    return [schema.model_dump(exclude_unset=True, exclude_none=True)]


def thinking_kwargs(thinking: bool | None) -> dict:
    """``chat_template_kwargs`` for a thinking setting; None (a template without the switch) adds nothing."""
    return {} if thinking is None else {"enable_thinking": bool(thinking)}


def template_thinking_kwargs(tokenizer, thinking: bool) -> dict:
    """``chat_template_kwargs`` for this tokenizer: ``enable_thinking`` when its template has the switch.

    Off unless asked: a Qwen3 template left to its default thinks, which is not what we train.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    if "enable_thinking" not in (template if isinstance(template, str) else str(template)):
        if thinking:
            raise ValueError("thinking=True is not valid for this model: its chat template has no enable_thinking "
                             "switch (Qwen3 templates have one); leave thinking off")
        return {}
    return {"enable_thinking": bool(thinking)}


def token_ids(encoded) -> list[int]:
    """``apply_chat_template(tokenize=True)`` output as a flat list (transformers 5 returns a BatchEncoding)."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


def truncate_tool_text(text: str, max_length: int, side: str = "middle") -> str:
    """A tool result as verl 0.7.1's ``ToolAgentLoop`` cuts it (``left`` keeps the start, ``right`` the end)."""
    if side not in TRUNCATE_SIDES:
        raise ValueError(f"tool_response_truncate_side={side!r} is not valid: expected one of {TRUNCATE_SIDES}")
    if not text or len(text) <= max_length:
        return text
    if side == "left":
        return text[:max_length] + "...(truncated)"
    if side == "right":
        return "(truncated)..." + text[-max_length:]
    half = max_length // 2
    return text[:half] + "...(truncated)..." + text[-half:]


@dataclass(frozen=True)
class ToolOutputLimit:
    """verl's ``multi_turn.max_tool_response_length`` (characters) and ``tool_response_truncate_side``."""

    max_length: int = 1600
    side: str = "middle"

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_tool_response_length={self.max_length} is not valid: expected an integer >= 1")
        if self.side not in TRUNCATE_SIDES:
            raise ValueError(f"tool_response_truncate_side={self.side!r} is not valid: expected one of "
                             f"{TRUNCATE_SIDES}")

    def apply(self, text: str) -> str:
        return truncate_tool_text(text, self.max_length, self.side)

    @property
    def longest(self) -> int:
        """The most characters a cut result can have (the cut adds a marker)."""
        marker = len("...(truncated)...") if self.side == "middle" else len("...(truncated)")
        return self.max_length + marker


@dataclass
class ChatRenderer:
    """Token ids of prompts and tool turns, rendered as verl 0.7.1's agent loop renders them."""

    tokenizer: object
    tools: list[dict] | None = None
    chat_template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass the chat model's own tokenizer, whose "
                             "template verl uses to render prompts.")
        if self.tools is None:
            self.tools = verl_tool_schemas()
        self._system_prompt: list[int] | None = None

    def _render(self, messages: list[dict], *, tools, tokenize: bool):
        try:
            from verl.utils.chat_template import apply_chat_template  # verl: optional, slow to import
        except ImportError:
            return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=tokenize, **self.chat_template_kwargs)
        return apply_chat_template(self.tokenizer, messages, tools=tools, add_generation_prompt=True,
                                   tokenize=tokenize, **self.chat_template_kwargs)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return token_ids(self._render(messages, tools=self.tools, tokenize=True))

    def prompt_text(self, messages: list[dict]) -> str:
        return self._render(messages, tools=self.tools, tokenize=False)

    @property
    def system_prompt_ids(self) -> list[int]:
        """What the template puts before any conversation (Qwen2.5: its default system turn; Qwen3: nothing)."""
        if self._system_prompt is None:
            try:
                from verl.utils.chat_template import initialize_system_prompt  # verl: optional, slow

                self._system_prompt = token_ids(initialize_system_prompt(self.tokenizer,
                                                                         **self.chat_template_kwargs))
                return self._system_prompt
            except ImportError:
                pass

            def render(count: int) -> list[int]:
                return token_ids(self.tokenizer.apply_chat_template([{"role": "user", "content": ""}] * count,
                                                                    add_generation_prompt=False, tokenize=True))

            one, two = render(1), render(2)
            self._system_prompt = one[:len(one) - (len(two) - len(one))]
        return self._system_prompt

    def tool_turn_ids(self, tool_texts: list[str]) -> list[int]:
        """The tokens verl appends after an assistant turn for its tool results (generation prompt included)."""
        messages = [{"role": "tool", "content": text} for text in tool_texts]
        return token_ids(self._render(messages, tools=None, tokenize=True))[len(self.system_prompt_ids):]

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class RolloutLimits:
    """The limits verl's agent loop runs under, read from config/search_multiturn_grpo.yaml.

    gen-data and evaluation are not verl runs; reading the training config keeps their rollouts
    under the same prompt and response budget, turn cap and tool-output cut as training.
    """

    max_prompt_tokens: int
    max_response_tokens: int
    max_turns: int
    tool_output: ToolOutputLimit

    @classmethod
    def from_training_config(cls, max_prompt_tokens: int | None = None,
                             thinking: bool | None = None) -> "RolloutLimits":
        import yaml  # ~15 ms to import, on the `drzero --help` path: only reading the config needs it

        config = yaml.safe_load((config_dir() / "search_multiturn_grpo.yaml").read_text())
        multi_turn = config["actor_rollout_ref"]["rollout"]["multi_turn"]
        return cls(max_prompt_tokens=int(max_prompt_tokens or config["data"]["max_prompt_length"]),
                   max_response_tokens=THINKING_RESPONSE_LENGTH if thinking else
                   int(config["data"]["max_response_length"]),
                   max_turns=int(multi_turn["max_assistant_turns"]),
                   tool_output=ToolOutputLimit(int(multi_turn["max_tool_response_length"]),
                                               str(multi_turn.get("tool_response_truncate_side", "middle"))))
