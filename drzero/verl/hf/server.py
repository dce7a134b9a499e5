"""`python -m drzero.verl.hf.server`: a model served in SGLang's OpenAI-compatible shape with ``transformers``.

    python -m drzero.verl.hf.server --model /checkpoints/solver_iter1_hf --port 8001 --served-model-name solver

The proposer reward probes the current solver through SGLang's native ``/generate`` (token ids in and out,
rendered as verl renders them), and other clients use ``/v1/chat/completions`` (or ``/v1/completions``).
Where SGLang cannot run (``--engine hf``: a GPU without SGLang's image, or a CPU), this server answers the
same requests: ``GET /health``, ``GET /v1/models``, ``POST /generate`` (``input_ids`` and
``sampling_params``; replies ``output_ids``, ``text`` and ``meta_info.finish_reason.type``), ``POST /v1/chat/completions``
(messages and tools rendered with the model's chat template, as SGLang does) and ``POST /v1/completions``
(a raw prompt). Replies carry ``choices[0].message.content`` / ``choices[0].text``, ``finish_reason``
(``stop`` / ``length``) and ``usage``; tool calls stay in the text (SGLang without a tool-call parser), which
our rollout client parses. Generation is ``drzero.verl.hf.engine.HFEngine``: concurrent requests are batched,
sampling follows SGLang (``top_k`` -1 = none, temperature 0 = greedy, ``max_tokens`` clamped to the context).
Runs on aiohttp alone (no FastAPI), so it starts wherever torch and transformers are installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from pathlib import Path

from drzero.services.specs import ServiceSpec
from drzero.verl.hf.engine import HFEngine, ResponseLimits, stop_token_ids_of

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 2560    # verl's response_length in our config: a probe never needs more


def build_app(model_path: str, served_name: str, device: str | None = None, max_model_len: int | None = None):
    # Here, not at the top: torch and transformers take seconds, and callers that only want
    # hf_server_service (the stages, the smoke) never serve.
    import torch
    from aiohttp import web
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    context = max_model_len or int(getattr(model.config, "max_position_embeddings", 32768))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = HFEngine(model, limits=ResponseLimits(context, DEFAULT_MAX_TOKENS, context),
                      stop_token_ids=stop_token_ids_of(model, tokenizer), pad_token_id=pad)

    def bad_request(message: str):
        return web.json_response({"object": "error", "message": message, "code": 400}, status=400)

    async def complete(prompt_ids: list[int], body: dict):
        params = {"temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
                  "top_k": body.get("top_k", -1), "max_tokens": body.get("max_tokens", DEFAULT_MAX_TOKENS)}
        out = await engine.generate(prompt_ids, params)
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out.token_ids),
                 "total_tokens": len(prompt_ids) + len(out.token_ids)}
        return text, out.stop_reason, usage

    async def health(_request):
        return web.Response(text="ok")

    async def models(_request):
        return web.json_response({"object": "list", "data": [{"id": served_name, "object": "model"}]})

    async def chat(request):
        body = await request.json()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return bad_request("'messages' must be a non-empty list of chat messages")
        try:
            prompt_ids = tokenizer.apply_chat_template(messages, tools=body.get("tools"), add_generation_prompt=True,
                                                       tokenize=True, return_dict=False)
            text, reason, usage = await complete(list(prompt_ids), body)
        except ValueError as error:
            return bad_request(str(error))
        return web.json_response({
            "id": uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()), "model": served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": None},
                         "finish_reason": reason}],
            "usage": usage})

    async def completions(request):
        body = await request.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return bad_request("'prompt' must be a string")
        try:
            text, reason, usage = await complete(tokenizer(prompt, add_special_tokens=False)["input_ids"], body)
        except ValueError as error:
            return bad_request(str(error))
        return web.json_response({
            "id": uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()), "model": served_name,
            "choices": [{"index": 0, "text": text, "finish_reason": reason}], "usage": usage})

    async def native_generate(request):
        """SGLang's /generate for token ids: what drzero's probes and gen-data send (api="generate")."""
        body = await request.json()
        input_ids = body.get("input_ids")
        if not isinstance(input_ids, list) or not input_ids or not all(isinstance(t, int) for t in input_ids):
            return bad_request("'input_ids' must be a non-empty list of token ids (this server takes no 'text')")
        sampling = dict(body.get("sampling_params") or {})
        try:
            out = await engine.generate(input_ids, sampling)
        except ValueError as error:
            return bad_request(str(error))
        return web.json_response({
            "text": tokenizer.decode(out.token_ids, skip_special_tokens=True), "output_ids": list(out.token_ids),
            "meta_info": {"id": uuid.uuid4().hex, "finish_reason": {"type": out.stop_reason},
                          "prompt_tokens": len(input_ids), "completion_tokens": len(out.token_ids)}})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/generate", native_generate)
    app["engine"] = engine
    return app


def main(argv: list[str] | None = None) -> None:
    from aiohttp import web  # only the server process needs it (~0.15 s to import)

    parser = argparse.ArgumentParser(prog="python -m drzero.verl.hf.server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory (a merged checkpoint)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--served-model-name", default="solver", help="the name requests must use")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there; expected a model directory (a merged checkpoint, "
                     f"`drzero merge`, or `drzero tiny-model --out DIR`)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(build_app(args.model, args.served_model_name, args.device), host=args.host, port=args.port,
                print=None)


def hf_server_service(model_path: str, port: int, served_model_name: str = "solver", host: str = "127.0.0.1"):
    """This server as a supervised service (``drzero challenger --engine hf`` starts it for the probes)."""
    command = [sys.executable, "-m", "drzero.verl.hf.server", "--model", str(model_path), "--host", host,
               "--port", str(port), "--served-model-name", served_model_name]
    return ServiceSpec("hf-server", command, port, host=host, startup_timeout=600)


if __name__ == "__main__":
    main()
