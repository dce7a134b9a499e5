"""GPU smoke of whole training stages with the `hf` engine: one GPU, Python and torch, nothing else installed.

    python benchmarks/gpu_smoke.py --wheels WHEEL_DIR --model TINY_AGENT_DIR --work /tmp/smoke --table out.md
    python benchmarks/gpu_smoke.py --wheels WHEEL_DIR --train-model /tmp/tiny-agent --train-steps 1000 ...

What it runs, each part timed, with the GPU's peak memory (nvidia-smi, all processes) while it runs:

  install     the wheels in --wheels (ray without its Java jar, verl and what it imports) into a target
              folder, then this script again with them on PYTHONPATH
  tiny agent  with --train-model: `drzero tiny-model --trained`'s training on this GPU (seconds here,
              where a shared 2-core CPU needs half an hour), then the one-hop demo questions it answers
              at greedy decoding, which the solver trains on first: a 2-layer model cannot earn a
              reward otherwise
  retriever   the demo corpus served on loopback in the retriever's wire format (POST /retrieve); ranked by
              drzero.tools.tiny_agent.keyword_search — the real retriever's embedder weights (83 MB) do not fit
              the 64 MiB a GPU command may carry
  solver      `drzero solver --engine hf` for 2 steps (rollouts calling the search tool, EM reward, GRPO,
              FSDP update, a checkpoint per step); kill -9 of the whole process group once step 1 is saved,
              while step 2 runs; the same command again resumes from global_step_1 and finishes step 2
  merge       `drzero merge` of the last checkpoint, then the merged model loaded and asked one question
  challenger  `drzero challenger --engine hf` for 1 step (HRPO), the proposer reward's solver probes answered
              by `python -m drzero.verl.hf.server` over the merged solver (SGLang's API shape); the
              step's hop groups (the HRPO summary line) are checked: groups are hop counts, and each
              group's advantages average to zero

Then one table: part, pass/fail, seconds, key metrics (reward mean, search calls and tool-call parse
failures per trajectory from the step's rollout dump, step time, peak GPU memory from nvidia-smi and
torch's max allocated from verl's metrics). Why a benchmark script and not a `drzero` command: it installs
packages and kills processes, and its output is a measurement that goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import _env

SITE = "/tmp/drzero-smoke-site"
BOOTSTRAPPED = "DRZERO_GPU_SMOKE_BOOTSTRAPPED"
SOLVER_STEPS = 2
TRAIN_ROWS, VAL_ROWS, ROLLOUT_N, BATCH = 8, 4, 4, 4
# short episodes: a plumbing check on a 2-layer model, not a benchmark of the method
VERL_OVERRIDES = [
    "data.max_prompt_length=1024", "data.max_response_length=1024",
    "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=1024",
    # one search and an answer: the worst case the preflight's response-budget check allows at 1,024 tokens
    "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.actor.optim.lr=1e-5",
    "actor_rollout_ref.rollout.agent.num_workers=2", "reward.num_workers=2",
    "trainer.save_freq=1", "trainer.test_freq=-1", "trainer.val_before_train=false",
    "+ray_kwargs.ray_init.include_dashboard=false",
]


@dataclass
class Part:
    name: str
    ok: bool = False
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    note: str = ""


# -- helpers -------------------------------------------------------------------------------------

class GpuPeak:
    """Peak GPU memory used (MiB, all processes) while the block runs, polled with nvidia-smi."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak = max([self.peak] + [int(x) for x in out.split() if x.strip().isdigit()])
            except Exception:
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def say(message: str) -> None:
    print(f"[gpu-smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_metrics(path: Path) -> dict[int, dict]:
    """verl's file logger: one JSON line per step."""
    steps = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                steps[int(entry["step"])] = entry["data"]
    return steps


def rollout_stats(dump_dir: Path, step: int) -> dict:
    """Search calls and tool-call parse failures per trajectory, from verl's rollout dump of ``step``."""
    from drzero.prompts import parse_tool_calls

    path = dump_dir / f"{step}.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    calls = [parse_tool_calls(r["output"]) for r in rows]
    return {"trajectories": len(rows),
            "search_calls_per_traj": round(sum(r["output"].count("<tool_response>") for r in rows) / len(rows), 2),
            "tool_call_parse_failures_per_traj": round(sum(sum(not c.valid for c in cs) for cs in calls) / len(rows),
                                                       2),
            "answers_per_traj": round(sum("<answer>" in r["output"] for r in rows) / len(rows), 2),
            "score_mean_dump": round(sum(float(r["score"]) for r in rows) / len(rows), 3)}


def stop_ray() -> None:
    """Whatever Ray left behind after a kill -9 (raylet, GCS, workers holding the GPU)."""
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True,
                   timeout=120)
    time.sleep(2)


def latest(checkpoint: Path) -> int | None:
    from drzero.layout import latest_step

    return latest_step(checkpoint)


# -- the parts -------------------------------------------------------------------------------------

def start_retriever(port: int) -> str:
    """The demo corpus on loopback, in drzero's retriever wire format, in a thread of this process."""
    import asyncio

    from aiohttp import web

    from drzero.corpus.demo import build_demo_world
    from drzero.tools.tiny_agent import keyword_search

    passages = build_demo_world().passages()

    async def retrieve(request):
        body = await request.json()
        topk = int(body.get("topk", 3))
        result = [[{"document": {"id": p.source, "title": p.title, "contents": f"{p.title}\n{p.text}",
                                 "source": p.source}, "score": 1.0} for p in keyword_search(passages, q, topk)]
                  for q in body["queries"]]
        return web.json_response({"result": result})

    async def health(_request):
        return web.Response(text="ok")

    ready = threading.Event()

    def serve():
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/retrieve", retrieve)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(30)
    return f"http://127.0.0.1:{port}/retrieve"


def write_data(data_dir: Path, preferred: list[str] = ()) -> dict:
    """Solver rows (one-hop demo questions, those in ``preferred`` first) and proposer seed rows (demo
    passages, hops 1-2). ``preferred``: questions the tiny agent answers at greedy decoding (found on a
    CPU with drzero.tools.tiny_agent.episode), so that a model this small can earn a non-zero reward."""
    from drzero.atomic import commit_set, parquet_writer
    from drzero.corpus.demo import build_demo_world
    from drzero.data.seed import SeedDocument, seed_row
    from drzero.tools.eval_set import demo_rows
    from drzero.prompts import render_document

    world = build_demo_world()
    data_dir.mkdir(parents=True, exist_ok=True)
    pool = world.questions(1, count=400, seed=99)
    wanted = set(preferred)
    questions = [q for q in pool if q.question in wanted][:TRAIN_ROWS]
    chosen = len(questions)
    questions += [q for q in pool if q not in questions][:TRAIN_ROWS + VAL_ROWS - len(questions)]
    # each pair committed with its manifest, as gen-data and prepare-data commit them: the stages read no less
    commit_set({data_dir / "solver_iter1.parquet": parquet_writer(demo_rows(questions[:TRAIN_ROWS], "train")),
                data_dir / "solver_iter1_val.parquet": parquet_writer(demo_rows(questions[TRAIN_ROWS:], "test"))},
               data_dir / "solver_iter1.manifest.json", {})
    passages = world.passages()
    docs = [SeedDocument(p.source, p.title, render_document(p.title, p.text), len(p.text.split()), False)
            for p in passages[-2 * TRAIN_ROWS:]]    # papers: the passages proposers start from
    train = [seed_row(i, "train", 1 + i % 2, d, 0) for i, d in enumerate(docs[:TRAIN_ROWS])]
    val = [seed_row(i, "val", 1 + i % 2, d, None) for i, d in enumerate(docs[TRAIN_ROWS:TRAIN_ROWS + VAL_ROWS])]
    commit_set({data_dir / "zero_ratio4321.parquet": parquet_writer(train),
                data_dir / "zero_ratio4321_val.parquet": parquet_writer(val)},
               data_dir / "zero_ratio4321.manifest.json",  # hops 1 and 2 alike; preflight measures the prompts
               {"rows": len(train), "hop_ratio": "11", "partitions": [{"partition": 0, "rows": [0, len(train)]}]})
    return {"solver_rows_the_model_answers": f"{chosen}/{TRAIN_ROWS}"}


def tiny_agent_part(args) -> Part:
    """`drzero tiny-model --trained`'s training (drzero.tools.tiny_agent) on this GPU, then the one-hop questions
    it answers at greedy decoding (at most ``SCAN_SECONDS`` of looking)."""
    from drzero.tools.tiny_agent import AgentTrainingConfig, build_trained_agent

    started = time.monotonic()
    stats = build_trained_agent(args.train_model, AgentTrainingConfig(steps=args.train_steps, batch_size=16,
                                                                      time_limit_s=150))
    args.model = str(Path(args.train_model).resolve())
    args.questions_found = answered_questions(args.model, limit_s=SCAN_SECONDS)
    return Part("tiny agent", ok=stats["tool_call_rate"] > 0, seconds=time.monotonic() - started,
                metrics={**stats, "answered_of_scanned": f"{len(args.questions_found[0])}/{args.questions_found[1]}"})


SCAN_SECONDS = 20.0


def answered_questions(model_dir: str, limit_s: float) -> tuple[list[str], int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drzero.corpus.demo import build_demo_world
    from drzero.tools.tiny_agent import episode

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    world = build_demo_world()
    passages, found, scanned, started = world.passages(), [], 0, time.monotonic()
    for q in world.questions(1, count=400, seed=99):
        if time.monotonic() - started > limit_s or len(found) >= TRAIN_ROWS:
            break
        scanned += 1
        _, answer = episode(model, tokenizer, q.question, passages, max_new_tokens=64)
        if answer is not None and answer.strip().lower() == q.answer.lower():
            found.append(q.question)
    del model
    return found, scanned


def agent_questions(args) -> list[str]:
    return list(getattr(args, "questions_found", ([], 0))[0])


def stage_command(stage: str, args, retriever_url: str, steps: int, extra: list[str], *, batch: int = BATCH,
                  overrides: list[str] = VERL_OVERRIDES, checkpoints: Path | None = None, data: Path | None = None,
                  dump: Path | None = None) -> list[str]:
    """`drzero <stage> --engine hf` on one GPU (the learning curve gives its own batch, keys and folders)."""
    command = [sys.executable, "-m", "drzero.cli", stage, "--engine", "hf", "--iteration", "1", "--model", args.model,
               "--db", str(args.work / "db"), "--data-dir", str(data or args.work / "data"),
               "--checkpoints", str(checkpoints or args.work / "checkpoints"), "--gpus", "1", "--steps", str(steps),
               "--train-batch-size", str(batch), "--logger", "console,file", "--retriever-url", retriever_url]
    return command + extra + ["--", *overrides, f"trainer.rollout_data_dir={dump or args.work / ('dump_' + stage)}"]


def run_logged(command: list[str], log: Path, env: dict, kill_when=None, timeout: float = 240) -> tuple[int, bool]:
    """Run ``command`` in its own process group, output to ``log``; kill -9 the group when ``kill_when()``."""
    say("$ " + " ".join(command))
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                   start_new_session=True)
        killed, deadline = False, time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return -9, False
            if kill_when is not None and not killed and kill_when():
                say("kill -9 of the stage's process group")
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.5)
    return process.returncode, killed


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def solver_part(args, retriever_url: str) -> Part:
    part = Part("solver")
    checkpoint = args.work / "checkpoints" / "solver_iter1"
    log = args.work / "solver.log"
    command = stage_command("solver", args, retriever_url, SOLVER_STEPS, ["--rollout-n", str(ROLLOUT_N)])
    started = time.monotonic()
    first = args.work / "metrics_solver_run1.jsonl"

    def step1_saved() -> bool:   # verl writes latest_checkpointed_iteration.txt after the checkpoint itself
        if latest(checkpoint) == 1:
            time.sleep(args.kill_delay)      # step 2 is under way: rollouts are running
            return True
        return False

    with GpuPeak() as peak:
        code, killed = run_logged(command, log, {"VERL_FILE_LOGGER_PATH": str(first)}, kill_when=step1_saved)
    at_kill = latest(checkpoint)
    stop_ray()
    part.metrics["run1"] = f"exit {code}, killed={killed}, latest at kill={at_kill}"
    if not killed or at_kill != 1:
        part.note = f"kill -9 did not land in step 2 (killed={killed}, latest={at_kill}); log: {tail(log)}"
        part.seconds = time.monotonic() - started
        return part
    second = args.work / "metrics_solver_run2.jsonl"
    with GpuPeak() as peak2:
        code, _ = run_logged(command, log, {"VERL_FILE_LOGGER_PATH": str(second)})
    stop_ray()
    part.seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    resumed = "Load from checkpoint folder" in text or "Resuming from" in text
    steps1, steps2 = read_metrics(first), read_metrics(second)
    step2 = steps2.get(2, {})
    part.metrics.update({
        "run2": f"exit {code}, latest={latest(checkpoint)}, resumed={resumed}, steps logged={sorted(steps2)}",
        "reward_mean_step1": steps1.get(1, {}).get("critic/score/mean"),
        "reward_mean_step2": step2.get("critic/score/mean"),
        "adv_max_step2": step2.get("critic/advantages/max"),
        "step_s_step1": steps1.get(1, {}).get("timing_s/step"),
        "step_s_step2": step2.get("timing_s/step"),
        "torch_max_alloc_gb": step2.get("perf/max_memory_allocated_gb"),
        "peak_gpu_mib": max(peak.peak, peak2.peak),
        **{f"{k}_step1": v for k, v in rollout_stats(args.work / "dump_solver", 1).items()},
        **{f"{k}_step2": v for k, v in rollout_stats(args.work / "dump_solver", 2).items()},
    })
    part.ok = (code == 0 and latest(checkpoint) == 2 and resumed and 1 not in steps2 and 2 in steps2)
    if not part.ok:
        part.note = tail(log, 40)
    return part


def merge_part(args) -> Part:
    part = Part("merge")
    started = time.monotonic()
    log = args.work / "merge.log"
    code, _ = run_logged([sys.executable, "-m", "drzero.cli", "merge", "--stage", "solver", "--iteration", "1",
                          "--checkpoints", str(args.work / "checkpoints")], log, {})
    merged = args.work / "checkpoints" / "solver_iter1_hf"
    if code != 0 or not merged.exists():
        part.note, part.seconds = tail(log), time.monotonic() - started
        return part
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drzero.prompts import SEARCH_TOOL_SCHEMA, solver_messages

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).to("cuda").eval()
    base = AutoModelForCausalLM.from_pretrained(args.model)
    changed = sum(not torch.equal(a.detach().cpu().float(), b.detach().float())
                  for a, b in zip(model.parameters(), base.parameters()))
    ids = tokenizer.apply_chat_template(solver_messages("In what year was the paper 'x' published?"),
                                        tools=[SEARCH_TOOL_SCHEMA], add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=64, do_sample=False)
    reply = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    part.seconds = time.monotonic() - started
    part.metrics = {"tensors_changed_vs_base": f"{changed}/{len(list(base.parameters()))}",
                    "reply": reply[:80].replace("\n", " ")}
    part.ok = changed > 0 and len(reply) > 0
    del model
    torch.cuda.empty_cache()
    return part


@contextlib.contextmanager
def probe_server(model: Path | str, port: int, log: Path):
    """`python -m drzero.verl.hf.server` over ``model`` on ``port`` (the proposer reward's solver probes), once its
    /health answers (at most 2 minutes); killed with its process group on leaving."""
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "drzero.verl.hf.server", "--model", str(model), "--port",
                               str(port), "--served-model-name", "solver"], stdout=open(log, "ab"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except Exception:
                time.sleep(0.5)
        yield server
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def challenger_part(args, retriever_url: str) -> Part:
    part = Part("challenger")
    started = time.monotonic()
    merged = args.work / "checkpoints" / "solver_iter1_hf"
    port = 8011
    server_log = args.work / "hf_server.log"
    with probe_server(merged, port, server_log):
        log = args.work / "challenger.log"
        metrics_path = args.work / "metrics_challenger.jsonl"
        command = stage_command("challenger", args, retriever_url, 1,
                                ["--sglang-url", f"http://127.0.0.1:{port}", "--probes", "2"])
        with GpuPeak() as peak:
            code, _ = run_logged(command, log, {"VERL_FILE_LOGGER_PATH": str(metrics_path)})
        stop_ray()
    part.seconds = time.monotonic() - started
    step = read_metrics(metrics_path).get(1, {})
    from drzero.verl.hrpo import SUMMARY_PREFIX

    summaries = [json.loads(line.split(SUMMARY_PREFIX, 1)[1]) for line in log.read_text(errors="replace").splitlines()
                 if SUMMARY_PREFIX in line]
    groups = summaries[-1] if summaries else {}
    hop_keyed = bool(groups) and all(re.fullmatch(r"search_zero_\d", g) for g in groups)
    centred = all(abs(v["advantage_mean"]) < 1e-3 for v in groups.values() if v["n"] > 1)
    part.metrics = {"exit": code, "reward_mean": step.get("critic/score/mean"),
                    "step_s": step.get("timing_s/step"), "hrpo_groups": groups,
                    "hrpo_hop_keyed": hop_keyed, "hrpo_groups_centred": centred,
                    "peak_gpu_mib": peak.peak, "torch_max_alloc_gb": step.get("perf/max_memory_allocated_gb"),
                    "probe_requests": len(re.findall(r"POST /(?:generate|v1/chat/completions)",
                                                     server_log.read_text(errors="replace"))),
                    **rollout_stats(args.work / "dump_challenger", 1)}
    part.ok = code == 0 and bool(step) and hop_keyed and centred
    if not part.ok:
        part.note = tail(log, 40)
    return part


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def table(parts: list[Part]) -> str:
    lines = ["| part | result | seconds | key metrics |", "|---|---|---|---|"]
    for p in parts:
        shown_metrics = "; ".join(f"{k}={shown(v)}" for k, v in p.metrics.items())
        lines.append(f"| {p.name} | {'pass' if p.ok else 'FAIL'} | {p.seconds:.0f} | {shown_metrics} |")
    return "\n".join(lines)


def bootstrap(wheels: str) -> None:
    """Install the wheels into SITE and run this script again with them (and the checkout) importable."""
    if os.environ.get(BOOTSTRAPPED) or not wheels:
        return
    started = time.monotonic()
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", SITE, *files], check=True)
    env = {**os.environ, BOOTSTRAPPED: f"{time.monotonic() - started:.0f}",
           "PYTHONPATH": os.pathsep.join([str(_env.ROOT), SITE, os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([os.path.join(SITE, "bin"), os.environ.get("PATH", "")])}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", default="", help="folder of wheels to install first (none: already installed)")
    parser.add_argument("--model", default="", help="the tiny agent (drzero tiny-model --trained)")
    parser.add_argument("--train-model", default="", help="train the tiny agent here (on the GPU) into this folder "
                                                          "instead of --model")
    parser.add_argument("--train-steps", type=int, default=1500, help="optimizer steps for the tiny agent (default 1500)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/drzero-gpu-smoke"))
    parser.add_argument("--table", type=Path, default=None, help="also write the table here")
    parser.add_argument("--parts", default="solver,merge,challenger")
    parser.add_argument("--questions", default="", help="JSON list of one-hop demo questions to train the solver on "
                                                        "first (those the model answers; see write_data)")
    parser.add_argument("--kill-delay", type=float, default=1.0, help="seconds into step 2 before kill -9")
    args = parser.parse_args()
    bootstrap(args.wheels)
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.model or args.train_model):
        parser.error("give --model DIR or --train-model DIR")
    args.model = str(Path(args.model).resolve()) if args.model else ""
    _env.defaults(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_TMPDIR="/tmp/ray")
    parts = [Part("install", ok=True, seconds=float(os.environ.get(BOOTSTRAPPED, 0) or 0))]
    import importlib.metadata as md

    parts[0].metrics = {m: md.version(m) for m in ("torch", "transformers", "ray", "verl", "numpy")}
    started = time.monotonic()
    retriever_url = start_retriever(8010)
    preferred = json.loads(Path(args.questions).read_text()) if args.questions else []
    if args.train_model:
        say("part tiny agent")
        agent = tiny_agent_part(args)
        parts.append(agent)
        say(f"part tiny agent: {agent.metrics}")
        preferred += agent_questions(args)
        started = time.monotonic()
    data = write_data(args.work / "data", preferred)
    parts.append(Part("retriever+data", ok=True, seconds=time.monotonic() - started,
                      metrics={"url": retriever_url, "kind": "keyword stand-in, retriever wire format", **data}))
    wanted = args.parts.split(",")
    for name, run in (("solver", lambda: solver_part(args, retriever_url)), ("merge", lambda: merge_part(args)),
                      ("challenger", lambda: challenger_part(args, retriever_url))):
        if name not in wanted:
            continue
        say(f"part {name}")
        try:
            part = run()
        except Exception as error:  # the table still prints
            import traceback

            part = Part(name, note=f"{type(error).__name__}: {error}\n{traceback.format_exc()[-1500:]}")
        parts.append(part)
        say(f"part {name}: {'pass' if part.ok else 'FAIL'} {part.metrics} {part.note[-3000:]}")
    text = table(parts)
    print(text, flush=True)
    if args.table:
        args.table.write_text(text + "\n")
    return 0 if all(p.ok for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
