"""A tiny ChatML chat model built offline: a byte-level BPE tokenizer with our chat templates and a 2-layer Qwen2.

    tokenizer = build_chatml_tokenizer(corpus_texts(None, "corpus"))   # the built-in demo world's passages
    model = build_tiny_model(tokenizer, hidden_size=64, layers=2)

The tokenizer has ChatML special tokens and a chat template that renders tools and tool turns the way
Qwen-family templates do (``<tools>`` block in the system turn, ``<tool_call>`` in assistant turns, tool
results as ``<tool_response>`` in user turns); the model has random weights. `drzero tiny-model`
(``drzero.tools.tiny_model``) writes them; ``drzero.tools.tiny_agent`` trains one to search.
"""

from __future__ import annotations

import json
from typing import Iterable

from drzero.corpus.demo import build_demo_world
from drzero.corpus.store import CorpusStore
from drzero.data.budget import LONG_QUESTION
from drzero.prompts import PROPOSER_TEMPLATE, SEARCH_TOOL_SCHEMA, SOLVER_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Tags the prompts use get one token each, as they do in Qwen tokenizers.
TAG_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
              "<question>", "</question>", "<answer>", "</answer>"]

# Our own ChatML template with tool support. A system turn is always emitted; with tools, it
# lists their JSON schemas in <tools> and says how to call them. transformers renders templates
# with trim_blocks, which eats a newline right after a block tag: those newlines are {{ '\n' }}.
CHAT_TEMPLATE = (
    "{%- set system = messages[0].content if messages and messages[0].role == 'system' "
    "else 'You are a helpful assistant.' -%}"
    "<|im_start|>system\n{{ system }}"
    "{% if tools %}{{ '\\n\\n' }}# Tools\n\nFunctions you may call are described inside <tools></tools>:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call>:\n"
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>{% endif %}"
    "<|im_end|>\n"
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}{{ '\\n' }}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson if call.function.arguments is mapping "
    "else call.function.arguments }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role != 'system' %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The same turns in the Qwen3 style: no default system turn, consecutive tool results share one
# user turn, and the generation prompt honours ``enable_thinking``: when a caller passes
# ``enable_thinking=False`` it pre-fills an empty ``<think>`` block, as Qwen3's own template does,
# so that tests can check that every renderer passes the switch on.
QWEN3_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}{{ '\\n\\n' }}{% endif %}"
    "# Tools\n\nFunctions you may call are described inside <tools></tools>:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call>:\n"
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{% elif messages and messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}{{ '\\n' }}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson if call.function.arguments is mapping "
    "else call.function.arguments }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role != 'system' or not loop.first %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
CHAT_TEMPLATES = {"chatml": CHAT_TEMPLATE, "qwen3": QWEN3_CHAT_TEMPLATE}


def build_chatml_tokenizer(texts: Iterable[str], vocab_size: int = 4096, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on ``texts`` with ChatML tokens and our chat template."""
    # Here, not at the top: transformers takes seconds to import, and `drzero --help` imports this module;
    # tokenizers (light) comes along with it, as transformers' own backend.
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The prompt templates and the tool schema are repeated so that their words get merged tokens
    # whatever the corpus: a real chat tokenizer spends ~1.3 tokens per English word on them.
    fixed = [PROPOSER_TEMPLATE, SOLVER_TEMPLATE, CHAT_TEMPLATE, json.dumps(SEARCH_TOOL_SCHEMA), LONG_QUESTION]
    tokenizer.train_from_iterator(fixed * 200 + list(texts), trainer=trainer)
    # Tags are single tokens but not special: verl decodes responses with skip_special_tokens=True
    # and the rewards must still see <think>, <tool_call>, <answer>.
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=chat_template, model_max_length=32768,
                                   additional_special_tokens=["<|im_start|>"])


def build_tiny_model(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A Qwen2 causal LM with random weights sized for a CPU."""
    import torch  # torch and transformers: seconds to import, needed only to build the model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    return Qwen2ForCausalLM(config)


def corpus_texts(db: str | None, collection: str) -> list[str]:
    """Passage texts to train the tokenizer on: the corpus store at ``db``, or the built-in demo world."""
    if db is None:
        return [f"{d.title}\n{d.text}" for d in build_demo_world().passages()]
    store = CorpusStore.open_existing(db, collection)
    return store.collection.get(include=["documents"], limit=50_000)["documents"]
