"""Calibrate drzero's memory model against a real training step on one GPU.

    python benchmarks/memory_calibration.py                       # on a CUDA machine; writes $OUT or --out
    python benchmarks/memory_calibration.py --device cpu --tiny   # the code path on a CPU, no numbers

For Qwen2/Qwen3 architectures built from their config with random weights (no hub), one
training step as an FSDP rank does it, without the sharding: fp32 master weights, bf16
autocast, torch's AdamW (foreach), micro batch 2 x 4,096 tokens, log-probabilities by verl's
row-wise log-softmax, gradient checkpointing on and off. After a warm-up step (so AdamW's
moments exist), ``torch.cuda.max_memory_allocated()`` is read for the forward + backward and
for the optimizer step, and compared with ``drzero.models.memory.single_gpu_peak`` for the same
setup. The shapes come from drzero's own table of published config.json values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import _env

_env.setup()
from drzero.models.memory import (BF16_ACTIVATIONS, LOGIT_BYTES, TrainSetup, activation_bytes,  # noqa: E402
                                 single_gpu_peak)
from drzero.models.shapes import GIB, KNOWN_SHAPES, ModelShape  # noqa: E402

SIZES = ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B"]
TINY = ModelShape("tiny-qwen3", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, tied=True,
                  head_dim=16, qk_norm=True)
CHUNK = 128  # tokens per log-softmax row block, as verl's row-wise path keeps the transient small


def hf_model(shape: ModelShape, device: str):
    """A randomly initialised Hugging Face model of ``shape`` in fp32, SDPA attention, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = "qwen3" if shape.qk_norm else "qwen2"
    config = AutoConfig.for_model(
        model_type, hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied, head_dim=shape.head_dim, max_position_embeddings=8192, use_cache=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().train()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per token through log-softmax over row blocks (autocast runs it in fp32)."""
    flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    parts = [torch.log_softmax(rows, dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
             for rows, lab in zip(flat.split(CHUNK), flat_labels.split(CHUNK))]
    return torch.cat(parts).view_as(labels)


def train_step(model, optimizer, ids, labels, device_type: str, measure: bool) -> dict[str, float]:
    cuda = measure and device_type == "cuda"
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() if cuda else 0
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
        loss = -token_logprobs(logits, labels).mean()
        forward_end = torch.cuda.memory_allocated() if cuda else 0
    del logits
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        forward_backward = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    if not cuda:
        return {}
    torch.cuda.synchronize()
    step = torch.cuda.max_memory_allocated()
    return {"start": start / GIB, "forward_end": forward_end / GIB, "forward_backward": forward_backward / GIB,
            "optimizer_step": step / GIB, "peak": max(forward_backward, step) / GIB}


def measure(shape: ModelShape, checkpointing: bool, device: str, batch: int, seq: int) -> dict:
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    row = {"model": shape.name, "params_b": round(shape.params / 1e9, 3), "checkpointing": checkpointing,
           "tokens": batch * seq}
    setup = TrainSetup(shape, world=1, micro_batch=batch, sequence_tokens=seq, checkpointing=checkpointing)
    row["predicted"] = single_gpu_peak(setup)
    model = optimizer = None
    try:
        model = hf_model(shape, device)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
        generator = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(0, shape.vocab, (batch, seq), device=device, generator=generator)
        labels = torch.randint(0, shape.vocab, (batch, seq), device=device, generator=generator)
        train_step(model, optimizer, ids, labels, device_type, measure=False)  # AdamW's moments now exist
        began = time.perf_counter()
        row["measured"] = train_step(model, optimizer, ids, labels, device_type, measure=True)
        row["step_s"] = round(time.perf_counter() - began, 3)
    except torch.OutOfMemoryError as error:
        row["measured"] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        del model, optimizer
        if device_type == "cuda":
            torch.cuda.empty_cache()
    if "peak" in row["measured"]:
        row["error_pct"] = round(100 * (row["predicted"]["peak"] - row["measured"]["peak"])
                                 / row["measured"]["peak"], 1)
    return row


def bf16_activations(shape: ModelShape, device: str, batch: int, seq: int) -> dict:
    """What verl's FSDP compute keeps for backward: bf16 weights (as FSDP gathers them), autocast,
    no checkpointing; the forward's end minus its start, against the model's bf16 activation term."""
    kept, _ = activation_bytes(shape, batch * seq, False, BF16_ACTIVATIONS)
    row = {"model": shape.name, "predicted": (kept + LOGIT_BYTES * batch * seq * shape.vocab) / GIB}
    model = None
    try:
        model = hf_model(shape, device).to(torch.bfloat16)
        ids = torch.randint(0, shape.vocab, (batch, seq), device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
            loss = -token_logprobs(logits, ids).mean()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            row["measured"] = (torch.cuda.memory_allocated() - start) / GIB
            row["error_pct"] = round(100 * (row["predicted"] - row["measured"]) / row["measured"], 1)
        del logits, loss
    except torch.OutOfMemoryError as error:
        row["error"] = str(error).splitlines()[0]
    finally:
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | params | grad ckpt | measured fwd+bwd | measured AdamW step | measured peak | predicted peak "
             "(fwd+bwd / step) | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, p = r["measured"], r["predicted"]
        if "peak" in m:
            measured = f"{m['forward_backward']:.2f} | {m['optimizer_step']:.2f} | **{m['peak']:.2f}**"
            error = f"{r['error_pct']:+.1f}%"
        else:
            measured, error = f"{m.get('error', 'not measured (no CUDA)')} | | ", "n/a"
        lines.append(f"| {r['model']} | {r['params_b']}B | {'on' if r['checkpointing'] else 'off'} | {measured} | "
                     f"**{p['peak']:.2f}** ({p['forward_backward']:.2f} / {p['optimizer_step']:.2f}) | {error} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="one tiny model: checks the code path on a CPU")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the table and JSON")
    args = parser.parse_args()
    shapes = [TINY] if args.tiny else [KNOWN_SHAPES[name] for name in SIZES]
    seq = min(args.seq, 64) if args.tiny else args.seq
    rows = []
    for shape in shapes:
        for checkpointing in (True, False):
            rows.append(measure(shape, checkpointing, args.device, args.batch, seq))
            print(json.dumps(rows[-1]), flush=True)
    activations = [bf16_activations(shape, args.device, args.batch, seq) for shape in shapes]
    for row in activations:
        print(json.dumps(row), flush=True)
    import transformers

    env = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if args.device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        env = f"{torch.cuda.get_device_name()} ({total / GIB:.1f} GiB as CUDA reports it), " + env
    text = table(rows, f"Peak torch.cuda.max_memory_allocated() of one training step, GiB ({env}); micro batch "
                       f"{args.batch} x {seq} tokens; prediction: drzero.models.memory.single_gpu_peak")
    text += ("\n\nActivations + logits kept at the forward's end with bf16 weights (FSDP's compute dtype), no "
             "checkpointing, GiB; prediction: activation_bytes(BF16_ACTIVATIONS) + LOGIT_BYTES x tokens x vocab\n\n"
             "| model | measured | predicted | error |\n|---|---|---|---|\n")
    text += "\n".join(f"| {r['model']} | {r['measured']:.2f} | {r['predicted']:.2f} | {r['error_pct']:+.1f}% |"
                      if "measured" in r else f"| {r['model']} | {r.get('error', 'not measured (no CUDA)')} | "
                      f"{r['predicted']:.2f} | n/a |" for r in activations)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory-calibration.md").write_text(text + "\n")
    (out / "memory-calibration.json").write_text(json.dumps({"environment": env, "rows": rows,
                                                                        "bf16_activations": activations}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
