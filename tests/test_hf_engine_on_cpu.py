"""The `hf` rollout engine on CPU: SGLang's token limits, stop handling and sampling, on a real tiny Qwen2.

The model is a real ``transformers`` Qwen2 with random weights (vocabulary 97): generation is the product
path (left padding, KV cache, GenerationConfig), only the weights are meaningless. Expected outputs come from
the model itself: a greedy continuation of each prompt alone, a forward pass for log-probs.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from drzero.verl.hf.engine import Generation, HFEngine, ResponseLimits, Sampling, cut_at_stop

VOCAB, PAD = 97, 0
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": False}
PROMPTS = [[5, 17, 33, 8], [41, 2], [9, 9, 9, 60, 61, 70, 3], [12]]


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=96, pad_token_id=PAD, bos_token_id=None)
    model = Qwen2ForCausalLM(config).eval()
    # a shipped generation_config that verl's SGLang path ignores (Qwen's own has top_k=20, top_p=0.8)
    model.generation_config.do_sample, model.generation_config.top_k = True, 1
    return model


def engine(model, stop=(96,), prompt_length=8, response_length=12, max_model_len=64, **kw) -> HFEngine:
    return HFEngine(model, limits=ResponseLimits(prompt_length, response_length, max_model_len),
                    stop_token_ids=stop, pad_token_id=PAD, **kw)


def greedy_alone(model, prompt, n) -> list[int]:
    """The model's own greedy continuation of one unpadded prompt, by repeated forward passes."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_response_limit_is_sglangs():
    limits = ResponseLimits(prompt_length=10, response_length=6, max_model_len=20)
    assert limits.max_new_tokens(4) == 6                 # response_length binds
    assert limits.max_new_tokens(12) == 4                # multi-turn: prompt + response budget binds
    assert limits.max_new_tokens(17) == 0                # budget spent: clamped at 0
    assert limits.max_new_tokens(18, requested=50) == 2  # an explicit limit is clamped to the context
    assert limits.max_new_tokens(4, requested=3) == 3
    with pytest.raises(ValueError, match="exceeds the model's maximum context length"):
        limits.max_new_tokens(21)


def test_sampling_params_map_like_sglang():
    sampling, limit = Sampling.from_request({**GREEDY, "temperature": 0.7, "max_tokens": 9})
    assert limit == 9 and sampling.generate_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 1.0,
                                                         "top_k": 0, "repetition_penalty": 1.0}
    assert Sampling.from_request(GREEDY)[0].generate_kwargs()["do_sample"] is False
    assert Sampling.from_request({**GREEDY, "top_k": 5, "temperature": 1.0})[0].generate_kwargs()["top_k"] == 5
    with pytest.raises(ValueError, match="top_p"):
        Sampling.from_request({**GREEDY, "top_p": 0})


def test_cut_at_stop_keeps_the_stop_token_and_nothing_after():
    assert cut_at_stop([4, 5, 9, 9, 7], {9}, 10) == ([4, 5, 9], "stop")
    assert cut_at_stop([4, 5, 6], {9}, 2) == ([4, 5], "length")


def test_left_padded_batch_equals_each_prompt_alone(model):
    results = engine(model).generate_batch(PROMPTS, Sampling.from_request(GREEDY)[0], [6, 6, 6, 6])
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == greedy_alone(model, prompt, 6) and result.stop_reason == "length"


def test_stop_token_kept_and_nothing_after_it(model):
    alone = greedy_alone(model, PROMPTS[0], 8)
    stop = alone[3]                               # a token the model will emit: make it the EOS
    first = alone.index(stop)
    results = engine(model, stop=[stop]).generate_batch([PROMPTS[0], PROMPTS[1]], Sampling.from_request(GREEDY)[0],
                                                        [8, 8])
    assert results[0] == Generation(alone[:first + 1], None, "stop")
    other = greedy_alone(model, PROMPTS[1], 8)
    expected = other[:other.index(stop) + 1] if stop in other else other
    assert results[1].token_ids == expected     # the other row is not cut where row 0 stopped


def test_async_requests_are_batched_and_limited_per_request(model):
    eng = engine(model, prompt_length=8, response_length=5)

    async def ask_all():
        return await asyncio.gather(*[eng.generate(p, dict(GREEDY)) for p in PROMPTS])

    results = asyncio.run(ask_all())
    assert eng.calls == 1                          # four concurrent requests, one model.generate
    for prompt, result in zip(PROMPTS, results):
        limit = min(5, 8 + 5 - len(prompt))        # 5, 5, 5 (7-token prompt: min(5, 6)), 5
        assert result.token_ids == greedy_alone(model, prompt, limit)

    async def long_prompt():
        return await eng.generate(list(range(1, 12)), dict(GREEDY))   # 11 tokens: budget 8 + 5 - 11 = 2

    assert len(asyncio.run(long_prompt()).token_ids) == 2


def test_top_k_minus_one_is_no_top_k_and_the_models_config_is_not_used(model):
    # The fixture's generation_config says top_k=1 (greedy in effect). verl's top_k=-1 must sample from
    # the whole distribution; an explicit top_k=1 must be greedy.
    eng = engine(model)
    torch.manual_seed(1)
    prompts = [PROMPTS[0]] * 16
    sampled = eng.generate_batch(prompts, Sampling.from_request({**GREEDY, "temperature": 1.0})[0], [6] * 16)
    greedy = greedy_alone(model, PROMPTS[0], 6)
    assert sum(r.token_ids != greedy for r in sampled) >= 12
    top1 = eng.generate_batch(prompts[:4], Sampling.from_request({**GREEDY, "temperature": 1.0, "top_k": 1})[0],
                              [6] * 4)
    assert all(r.token_ids == greedy for r in top1)


def test_logprobs_are_the_models(model):
    result = engine(model).generate_batch([PROMPTS[2]], Sampling.from_request({**GREEDY, "logprobs": True})[0],
                                          [5])[0]
    ids = torch.tensor([PROMPTS[2] + result.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(PROMPTS[2])
    expected = [float(logp[start - 1 + i, t]) for i, t in enumerate(result.token_ids)]
    assert result.log_probs == pytest.approx(expected, abs=1e-4)
    assert engine(model).generate_batch([PROMPTS[2]], Sampling.from_request(GREEDY)[0], [3])[0].log_probs is None


def test_engine_refuses_no_stop_token(model):
    with pytest.raises(ValueError, match="stop token"):
        engine(model, stop=[None])
