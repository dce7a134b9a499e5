"""Learning, shown on one GPU: a GRPO curve of the solver beside two controls, with verl's real fit() (`hf` engine).

The wheels first, here (PyPI), into a folder git ignores: ray 2.41.0 without its Java jar and the 24 wheels verl
0.7.1 imports, 42 MB (the GPU machine has torch and transformers, no ray, verl, hydra):

    benchmarks/gpu_wheels.sh .bench/verl-wheels

Then on the lent GPU machine, from the repository root, one command of about 8 minutes (`carry`:
`.bench/verl-wheels`; the script installs them into /tmp and runs itself again, as benchmarks/gpu_smoke.py does):

    set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/learning_curve.py --wheels .bench/verl-wheels \
        --work /tmp/lc --out $OUT 2>&1 | tee $OUT/run.log

    python3 benchmarks/learning_curve.py --dry-run                  # the plan: data, the three runs' commands
    python benchmarks/learning_curve.py --report-from DIR [DIR2]    # table and PNG again (DIR2: a later --runs lr0)

What it does, in one command of about 8 minutes on an H100 (each verl run is a `drzero solver --engine hf`
process; verl and Ray start three times):

  agent      the tiny agent (drzero.tools.tiny_agent, 2 layers, width 128) trained on this GPU on its scripted
             trajectories plus, for each of --questions held-out one-hop questions, one episode answering right
             and one answering wrong (an answer of the same relation): it calls the search tool and its answers
             to those questions are split between the two, so it "partly answers" them and only the reward can
             say which answer is right. Greedy exact match on them is measured here (before).
  retriever  the demo corpus on loopback in the retriever's wire format (benchmarks/gpu_smoke.py), so the search
             tool, its HTTP client and the tool responses are drzero's own
  curve      `drzero solver --engine hf`: GRPO, --steps steps, the fixed set of --questions prompts x --rollout-n
             samples every step (the whole set is one batch), checkpoint at the last step, then `drzero merge`
             and greedy exact match on the same questions (after)
  shuffled   the same, with each trajectory's reward replaced by another's of the same batch
             (algorithm.adv_estimator=grpo_shuffled_rewards, drzero.verl.controls)
  lr0        the same, with actor_rollout_ref.actor.optim.lr=0
  loss mask  the curve's trajectories (token ids and response mask, dumped by drzero.rollout.agent_loop): every
             token of a tool turn must have mask 0 and every token the model wrote mask 1
  report     learning_curve.md, learning_curve.png (reward mean per step, three lines), steps.jsonl,
             summary.json and models.tar (the agent and the trained solver, for --parts proposer) in --out,
             rewritten after every run, so a command cut short still returns what finished

Per step it records the reward mean (verl's critic/score/mean), and from verl's rollout dump the search calls
and tool-call parse failures per trajectory. Targets: the curve's mean reward over its last 10 steps at least
0.2 above its first 10, both controls within 0.05, and no tool-response token inside the loss mask.

`--parts proposer` (optional, a second command of about 4 minutes: it does not fit beside the three runs):
`drzero challenger --engine hf` for --proposer-steps HRPO steps twice, the proposer reward's solver probes
answered by `python -m drzero.verl.hf.server` over the solver before (the agent) and after (the curve's merged
solver). Dr. Zero's reward pays for questions the solver answers sometimes, not always: proposals about the
questions the solver learned should earn less difficulty after its training. Bring the first command's
models.tar back (carried in, say, `.bench/lc-models`), then:

    mkdir -p /tmp/lcm && tar xf .bench/lc-models/models.tar -C /tmp/lcm && python3 benchmarks/learning_curve.py \
        --wheels .bench/verl-wheels --parts proposer --model /tmp/lcm/agent --solver-after /tmp/lcm/solver_after \
        --work /tmp/lc --out $OUT
"""

from __future__ import annotations

import json
import os
import random
import shlex
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import _env

ROOT = _env.setup("benchmarks")
import gpu_smoke  # noqa: E402
from learning_report import checked_loss_mask, read_steps, summary_verdicts, write_report  # noqa: E402

from drzero.verl.controls import SHUFFLED_GRPO  # noqa: E402

QUESTIONS, ROLLOUT_N, STEPS, LR = 16, 8, 30, 5e-4
# one search and an answer with the tiny agent's tokenizer: prompts <= 300 tokens, a search result ~260, a tool call
# <= 44 (every one-hop demo question), an answer <= 11; the preflight's worst case for one search and an answer is
# 863. TURN_TOKENS: the hf engine's cap per call, 20 over the longest tool call
PROMPT_TOKENS, RESPONSE_TOKENS, TURN_TOKENS = 512, 896, 64
RUNS = ("curve", "shuffled", "lr0")
RUN_LABELS = {"curve": "GRPO", "shuffled": "control: rewards shuffled across the batch",
              "lr0": "control: learning rate 0"}


def say(message: str) -> None:
    print(f"[learning-curve {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class RunSpec:
    name: str
    overrides: tuple[str, ...]
    saves: bool            # a checkpoint at the last step (the curve: merged for "after" and the proposer part)


def run_specs(args) -> list[RunSpec]:
    by_name = {"curve": RunSpec("curve", (f"actor_rollout_ref.actor.optim.lr={args.lr}",), True),
               "shuffled": RunSpec("shuffled", (f"actor_rollout_ref.actor.optim.lr={args.lr}",
                                                f"algorithm.adv_estimator={SHUFFLED_GRPO}"), False),
               "lr0": RunSpec("lr0", ("actor_rollout_ref.actor.optim.lr=0.0",), False)}
    return [by_name[name] for name in args.runs.split(",") if name]


def verl_overrides(args, spec: RunSpec) -> list[str]:
    from drzero.verl.hf.engine import TURN_LIMIT_KEY

    return [f"data.max_prompt_length={PROMPT_TOKENS}", f"data.max_response_length={RESPONSE_TOKENS}",
            "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=2",
            # a sample that never stops costs TURN_TOKENS decode steps of its batch, not the response budget
            f"+actor_rollout_ref.rollout.custom.{TURN_LIMIT_KEY}={TURN_TOKENS}",
            f"actor_rollout_ref.rollout.temperature={args.temperature}",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32",
            "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0",
            "actor_rollout_ref.rollout.agent.num_workers=2", "reward.num_workers=2",
            f"trainer.total_epochs={args.steps}",       # the whole set is one batch: one epoch per step
            f"trainer.save_freq={args.steps if spec.saves else -1}", "trainer.test_freq=-1",
            "trainer.val_before_train=false", "+ray_kwargs.ray_init.include_dashboard=false", *spec.overrides]


def run_command(args, spec: RunSpec, retriever_url: str) -> list[str]:
    folder = args.work / spec.name
    return gpu_smoke.stage_command("solver", args, retriever_url, args.steps, ["--rollout-n", str(args.rollout_n)],
                                   batch=args.questions, overrides=verl_overrides(args, spec),
                                   checkpoints=folder / "checkpoints", dump=folder / "dump")


# -- data ---------------------------------------------------------------------------------------------------

def rl_questions(count: int, seed: int = 0) -> list[tuple]:
    """(question, wrong answer) for the first ``count`` held-out one-hop questions of the tiny agent's split that
    have a wrong answer of the same relation (an answer of another question, none of the set's right answers)."""
    from drzero.tools.tiny_agent import split_questions

    train, held_out = split_questions(seed)
    right = {q.answer for q in held_out}
    chosen = []
    for q in held_out:
        wrong = sorted({o.answer for o in train if o.relation == q.relation} - right - {q.answer})
        if wrong:
            chosen.append((q, random.Random(f"{seed}:{q.question}").choice(wrong)))
    if len(chosen) < count:
        raise ValueError(f"--questions {count}: only {len(chosen)} held-out questions have a wrong answer to pair")
    return chosen[:count]


def two_answer_conversations(pairs: list[tuple], seed: int = 0) -> list[list[dict]]:
    """For each (question, wrong answer): the scripted episode answering right and the same answering wrong."""
    from drzero.corpus.demo import build_demo_world
    from drzero.tools.tiny_agent import solver_conversation

    passages = build_demo_world().passages()
    by_source = {p.source: p for p in passages}
    rng = random.Random(seed)
    conversations = []
    for question, wrong in pairs:
        right = solver_conversation(question, passages, by_source, rng)
        conversations += [right, right[:-1] + [{"role": "assistant", "content": f"<answer>{wrong}</answer>"}]]
    return conversations


def write_solver_set(data_dir: Path, questions: list) -> None:
    """The fixed set as the solver stage reads it (train and val files committed with their manifest)."""
    from drzero.atomic import commit_set, parquet_writer
    from drzero.tools.eval_set import demo_rows

    data_dir.mkdir(parents=True, exist_ok=True)
    commit_set({data_dir / "solver_iter1.parquet": parquet_writer(demo_rows(questions, "train")),
                data_dir / "solver_iter1_val.parquet": parquet_writer(demo_rows(questions, "test"))},
               data_dir / "solver_iter1.manifest.json", {})


def greedy_exact_match(model_dir: Path, questions: list) -> dict:
    """The tiny agent's greedy episodes (search, then answer) over ``questions``: tool-call rate, exact match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drzero.tools.tiny_agent import evaluate_agent

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    stats = evaluate_agent(model, tokenizer, questions)
    del model
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}


# -- the runs -----------------------------------------------------------------------------------------------

def run_one(args, spec: RunSpec, retriever_url: str, timeout: float) -> dict:
    """One verl run; its per-step rows (reward, searches, parse failures, step time) and how it ended."""
    folder = args.work / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    metrics_path = folder / "metrics.jsonl"
    env = {"VERL_FILE_LOGGER_PATH": str(metrics_path)}
    if spec.name == "curve":   # the loss-mask check reads the curve's own trajectories
        env.update({"DRZERO_TRAJECTORY_DUMP": str(folder / "trajectories"), "DRZERO_TRAJECTORY_DUMP_LIMIT": "256"})
    started = time.monotonic()
    code, _ = gpu_smoke.run_logged(run_command(args, spec, retriever_url), folder / "run.log", env, timeout=timeout)
    gpu_smoke.stop_ray()
    steps = gpu_smoke.read_metrics(metrics_path)
    rows = []
    for step in sorted(steps):
        data, dump = steps[step], gpu_smoke.rollout_stats(folder / "dump", step)
        rows.append({"run": spec.name, "step": step, "reward_mean": data.get("critic/score/mean"),
                     "searches_per_traj": dump.get("search_calls_per_traj"),
                     "parse_failures_per_traj": dump.get("tool_call_parse_failures_per_traj"),
                     "answers_per_traj": dump.get("answers_per_traj"), "step_s": data.get("timing_s/step"),
                     "gen_s": data.get("timing_s/gen"), "grad_norm": data.get("actor/grad_norm"),
                     "entropy": data.get("actor/entropy")})
    return {"exit": code, "seconds": round(time.monotonic() - started, 1), "steps_logged": len(rows), "rows": rows,
            "log_tail": "" if code == 0 else gpu_smoke.tail(folder / "run.log", 30)}


def merge_curve(args) -> Path | None:
    merged = args.work / "curve" / "checkpoints" / "solver_iter1_hf"
    code, _ = gpu_smoke.run_logged([sys.executable, "-m", "drzero.cli", "merge", "--stage", "solver", "--iteration",
                                    "1", "--checkpoints", str(args.work / "curve" / "checkpoints")],
                                   args.work / "merge.log", {}, timeout=180)
    return merged if code == 0 and merged.exists() else None


def pack_models(out: Path, models: dict[str, Path]) -> None:
    """The agent and the trained solver in one file (a command gets at most 8 files back)."""
    with tarfile.open(out / "models.tar", "w") as tar:
        for name, path in models.items():
            if path and Path(path).exists():
                tar.add(path, arcname=name)


def proposer_part(args, retriever_url: str) -> dict:
    """`drzero challenger --engine hf` with the probes answered by the solver before and after its training."""
    gpu_smoke.write_data(args.work / "proposer_data")
    results = {}
    for label, solver, port in (("before", args.model, 8021), ("after", args.solver_after, 8022)):
        folder = args.work / f"proposer_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        with gpu_smoke.probe_server(solver, port, folder / "server.log"):
            command = gpu_smoke.stage_command(
                "challenger", args, retriever_url, args.proposer_steps,
                ["--sglang-url", f"http://127.0.0.1:{port}", "--probes", "4"], data=args.work / "proposer_data",
                checkpoints=folder / "checkpoints", dump=folder / "dump",
                overrides=[*gpu_smoke.VERL_OVERRIDES, "trainer.save_freq=-1"])   # the later key wins
            code, _ = gpu_smoke.run_logged(command, folder / "run.log",
                                           {"VERL_FILE_LOGGER_PATH": str(folder / "metrics.jsonl")}, timeout=300)
            gpu_smoke.stop_ray()
        steps = gpu_smoke.read_metrics(folder / "metrics.jsonl")
        results[label] = {"exit": code, "steps": [
            {"step": s, "reward_mean": d.get("critic/score/mean"), "k_mean": d.get("drzero/k/mean"),
             "n_mean": d.get("drzero/n/mean"), "difficulty_mean": d.get("drzero/difficulty/mean"),
             "format_mean": d.get("drzero/format/mean")} for s, d in sorted(steps.items())]}
    return results


# -- the command --------------------------------------------------------------------------------------------

def plan_text(args) -> str:
    lines = [f"agent: tiny agent, {args.train_steps} supervised steps, plus right and wrong episodes for "
             f"{args.questions} held-out questions; greedy exact match before",
             f"data: {args.work / 'data'} (solver_iter1.parquet: the {args.questions} questions)"]
    for spec in run_specs(args):
        lines.append(f"run {spec.name} ({RUN_LABELS[spec.name]}):\n    "
                     + shlex.join(run_command(args, spec, "http://127.0.0.1:8010/retrieve")))
    lines.append("then: drzero merge of the curve, greedy exact match after, the loss-mask check, the report")
    return "\n".join(lines)


def merged_reports(folders: list[Path]) -> tuple[dict, list[dict]]:
    """The first folder's summary and steps, with the runs (and any missing part) of the later folders added."""
    summary, rows = {}, {}
    for folder in folders:
        theirs = json.loads((Path(folder) / "summary.json").read_text())
        for key, value in theirs.items():
            if key == "runs":
                summary.setdefault("runs", {}).update(value)
            elif value and not summary.get(key):
                summary[key] = value
        rows.update({(r["run"], r["step"]): r for r in read_steps(Path(folder) / "steps.jsonl")})
    return summary, list(rows.values())


def parse_args(argv=None):
    parser = _env.parser(__doc__)
    parser.add_argument("--wheels", default="", help="folder of wheels to install first (none: already installed)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/drzero-learning-curve"))
    parser.add_argument("--out", type=Path, default=Path("learning-curve-out"), help="where the report goes")
    parser.add_argument("--parts", default="curve", help="curve (agent, the runs, report) and/or proposer")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"which of {','.join(RUNS)} (default: all)")
    parser.add_argument("--model", default="", help="an agent already trained (skips the agent part)")
    parser.add_argument("--solver-after", default="", help="--parts proposer: the trained solver (merged)")
    parser.add_argument("--questions", type=int, default=QUESTIONS, help="prompts in the fixed set (the batch)")
    parser.add_argument("--rollout-n", type=int, default=ROLLOUT_N, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=STEPS, help="GRPO steps per run")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate of the curve and the shuffled control")
    parser.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    parser.add_argument("--train-steps", type=int, default=1000, help="the agent's supervised steps")
    parser.add_argument("--proposer-steps", type=int, default=2, help="HRPO steps per proposer run")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock seconds for the whole command: a run that would overrun is cut or skipped")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the runs' commands, run nothing")
    parser.add_argument("--report-from", type=Path, nargs="+", default=None, metavar="DIR",
                        help="rewrite the table and PNG in the first DIR from its steps.jsonl and summary.json, with "
                             "the runs of the other DIRs (commands that ran the rest, e.g. --runs lr0) added")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    args.model = str(Path(args.model).resolve()) if args.model else str(args.work / "agent")
    if args.questions < 2 or args.rollout_n < 2 or args.steps < 20:
        parser.error("need --questions >= 2, --rollout-n >= 2 (GRPO groups) and --steps >= 20 (first and last 10)")
    return args


def curve_part(args, started: float, summary: dict, retriever_url: str, write) -> None:
    from drzero.tools.tiny_agent import AgentTrainingConfig, build_trained_agent

    pairs = rl_questions(args.questions)
    questions = [q for q, _ in pairs]
    summary["questions"] = [{"question": q.question, "answer": q.answer, "wrong": w} for q, w in pairs]
    if not Path(args.model, "config.json").exists():
        say("agent: supervised pass on the GPU")
        t0 = time.monotonic()
        summary["agent"] = build_trained_agent(args.model, AgentTrainingConfig(steps=args.train_steps, batch_size=16,
                                                                                time_limit_s=150),
                                               extra_conversations=two_answer_conversations(pairs))
        summary["agent"]["seconds_total"] = round(time.monotonic() - t0, 1)
    summary["exact_match_before"] = greedy_exact_match(Path(args.model), questions)
    write_solver_set(args.work / "data", questions)
    write()
    durations = []
    for spec in run_specs(args):
        left = args.budget_s - (time.monotonic() - started) - 45      # the merge, the checks and the report
        expected = max(durations, default=0)
        if left < 60 or left < 0.8 * expected:
            summary["runs"][spec.name] = {"skipped": f"{left:.0f} s left of --budget-s, a run took {expected:.0f} s"}
            say(f"run {spec.name}: skipped ({summary['runs'][spec.name]['skipped']})")
            continue
        say(f"run {spec.name}: {args.steps} steps, {left:.0f} s left")
        result = run_one(args, spec, retriever_url, timeout=left)
        durations.append(result["seconds"])
        summary["steps"] += result.pop("rows")
        summary["runs"][spec.name] = result
        say(f"run {spec.name}: exit {result['exit']}, {result['steps_logged']} steps in {result['seconds']} s")
        if result["steps_logged"] == 0:     # the plumbing failed: the other runs share it; the log tail says why
            write()
            say(f"run {spec.name} logged no step; the remaining runs are not started:\n{result['log_tail']}")
            return
        if spec.name == "curve":
            summary["loss_mask"] = checked_loss_mask(args.work / "curve" / "trajectories", args.model)
            merged = merge_curve(args) if result["exit"] == 0 else None
            if merged:
                summary["exact_match_after"] = greedy_exact_match(merged, questions)
            args.solver_after = str(merged or "")
            pack_models(args.out, {"agent": Path(args.model), "solver_after": merged})
        write()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_from:
        summary, rows = merged_reports(args.report_from)
        write_report(args.report_from[0], rows, summary)
        return 0
    if args.dry_run:
        print(plan_text(args))
        return 0
    gpu_smoke.bootstrap(args.wheels)
    started = time.monotonic() - float(os.environ.get(gpu_smoke.BOOTSTRAPPED, 0) or 0)
    _env.defaults(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_TMPDIR="/tmp/ray")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    summary = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "command": shlex.join([Path(sys.executable).name, *sys.argv]),
               "settings": {k: getattr(args, k) for k in ("questions", "rollout_n", "steps", "lr", "temperature",
                                                          "train_steps")},
               "runs": {}, "steps": []}

    def write():
        summary["verdicts"] = summary_verdicts(summary)
        write_report(args.out, summary["steps"], summary)

    retriever_url = gpu_smoke.start_retriever(8010)
    parts = args.parts.split(",")
    if "curve" in parts:
        curve_part(args, started, summary, retriever_url, write)
    if "proposer" in parts:
        if not args.solver_after:
            say("proposer: no trained solver (give --solver-after or run the curve first); skipped")
        else:
            say("proposer: challenger steps probing the solver before and after")
            summary["proposer"] = proposer_part(args, retriever_url)
    summary["seconds_total"] = round(time.monotonic() - started, 1)
    write()
    print((args.out / "learning_curve.md").read_text(), flush=True)
    return 0 if all(summary["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
