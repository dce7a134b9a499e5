"""The learning curve's checks and report (benchmarks/learning_curve.py): CPU only, no verl.

    python benchmarks/learning_curve.py --report-from OUT_DIR     # the table and PNG again from steps.jsonl

* ``loss_mask_counts`` — on dumped trajectories (``{"response_ids", "response_mask"}`` per line, written by
  drzero.rollout.agent_loop), every token of a tool turn (from ``<|im_start|>`` of the tool's turn to the
  ``<|im_start|>assistant`` line that hands the turn back) must have mask 0, every other token (what the model
  wrote) mask 1.
* ``window_change`` — a run's mean reward over its last 10 steps minus its first 10.
* ``write_report`` — steps.jsonl, summary.json, learning_curve.md and learning_curve.png (matplotlib, if there).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

WINDOW = 10
RISE, FLAT = 0.2, 0.05      # the targets: the curve rises by 0.2, the controls move less than 0.05
LABELS = {"curve": "GRPO", "shuffled": "shuffled rewards", "lr0": "learning rate 0"}
_TOOL_TURN = re.compile(r"<\|im_start\|>(?:user|tool)\b.*?(?:<\|im_start\|>assistant\n|$)", re.DOTALL)
_TOOL_RESPONSE = re.compile(r"<tool_response>.*?</tool_response>", re.DOTALL)


# -- the loss mask ------------------------------------------------------------------------------------------

def _spans(pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)]


def _inside(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return any(start < e and s < end for s, e in spans)


def loss_mask_counts(records: list[dict], tokenizer) -> dict:
    """Tokens of tool turns and of the model, and how many of each the loss mask gets wrong."""
    counts = dict.fromkeys(("trajectories", "with_tool_turn", "tool_turn_tokens", "tool_turn_tokens_in_loss",
                            "tool_response_tokens", "tool_response_tokens_in_loss", "model_tokens",
                            "model_tokens_outside_loss"), 0)
    for record in records:
        ids, mask = record["response_ids"], record["response_mask"]
        if len(ids) != len(mask):
            raise ValueError(f"a dumped trajectory has {len(ids)} token ids but {len(mask)} mask values")
        pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        text, offsets, at = "".join(pieces), [], 0
        for piece in pieces:
            offsets.append((at, at + len(piece)))
            at += len(piece)
        turns, responses = _spans(_TOOL_TURN, text), _spans(_TOOL_RESPONSE, text)
        counts["trajectories"] += 1
        counts["with_tool_turn"] += bool(turns)
        for (start, end), m in zip(offsets, mask):
            if _inside(start, end, turns):
                counts["tool_turn_tokens"] += 1
                counts["tool_turn_tokens_in_loss"] += m == 1
                if _inside(start, end, responses):
                    counts["tool_response_tokens"] += 1
                    counts["tool_response_tokens_in_loss"] += m == 1
            else:
                counts["model_tokens"] += 1
                counts["model_tokens_outside_loss"] += m != 1
    return counts


def read_trajectories(folder: Path) -> list[dict]:
    records = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def checked_loss_mask(folder: Path, tokenizer_dir: str) -> dict:
    from transformers import AutoTokenizer

    records = read_trajectories(folder)
    if not records:
        return {"error": f"no dumped trajectories in {folder}"}
    return loss_mask_counts(records, AutoTokenizer.from_pretrained(tokenizer_dir))


# -- the numbers --------------------------------------------------------------------------------------------

def read_steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rewards_of(rows: list[dict], run: str) -> list[float]:
    return [r["reward_mean"] for r in sorted((r for r in rows if r["run"] == run), key=lambda r: r["step"])
            if r.get("reward_mean") is not None]


def window_change(rewards: list[float], window: int = WINDOW) -> dict | None:
    """First and last ``window`` steps' mean reward and the change; None under 2 windows of steps."""
    if len(rewards) < 2 * window:
        return None
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    return {"first": round(first, 4), "last": round(last, 4), "change": round(last - first, 4)}


def summary_verdicts(summary: dict) -> dict[str, bool]:
    rows = summary.get("steps", [])
    changes = {run: window_change(rewards_of(rows, run)) for run in LABELS}
    mask = summary.get("loss_mask") or {}
    return {f"GRPO: last {WINDOW} steps >= first {WINDOW} + {RISE}":
                bool(changes["curve"]) and changes["curve"]["change"] >= RISE,
            f"shuffled rewards: |change| < {FLAT}": bool(changes["shuffled"]) and abs(changes["shuffled"]["change"]) < FLAT,
            f"learning rate 0: |change| < {FLAT}": bool(changes["lr0"]) and abs(changes["lr0"]["change"]) < FLAT,
            "no tool-response token in the loss mask":
                mask.get("tool_turn_tokens", 0) > 0 and mask.get("tool_turn_tokens_in_loss", 1) == 0}


# -- the report ---------------------------------------------------------------------------------------------

def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], summary: dict) -> str:
    runs = [run for run in LABELS if any(r["run"] == run for r in rows) or run in summary.get("runs", {})]
    lines = ["# Learning curve: GRPO on one GPU, with controls", "",
             f"Card: {summary.get('card', '?')}. Command: `{summary.get('command', '?')}`", "",
             f"Settings: {json.dumps(summary.get('settings', {}))}", "",
             "| run | steps | reward, first 10 | reward, last 10 | change | searches / traj | parse failures / traj"
             " | seconds |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        run_rows = [r for r in rows if r["run"] == run]
        change = window_change(rewards_of(rows, run)) or {}
        info = summary.get("runs", {}).get(run, {})
        searches = [r["searches_per_traj"] for r in run_rows if r.get("searches_per_traj") is not None]
        failures = [r["parse_failures_per_traj"] for r in run_rows if r.get("parse_failures_per_traj") is not None]
        lines.append(f"| {LABELS[run]} | {len(run_rows)} | {_cell(change.get('first'))} | {_cell(change.get('last'))} "
                     f"| {_cell(change.get('change'))} | {_cell(sum(searches) / len(searches) if searches else None)} "
                     f"| {_cell(sum(failures) / len(failures) if failures else None)} "
                     f"| {_cell(info.get('seconds', info.get('skipped')))} |")
    before, after = summary.get("exact_match_before") or {}, summary.get("exact_match_after") or {}
    lines += ["", "Greedy exact match on the training questions (the tiny agent's own episodes: search, then answer):",
              "", "| | exact match | tool-call rate |", "|---|---|---|",
              f"| before (the agent) | {_cell(before.get('exact_match'))} | {_cell(before.get('tool_call_rate'))} |",
              f"| after (GRPO, merged) | {_cell(after.get('exact_match'))} | {_cell(after.get('tool_call_rate'))} |"]
    mask = summary.get("loss_mask") or {}
    if mask:
        lines += ["", "Loss mask on the GRPO run's trajectories (response mask: 1 = in the loss):", "",
                  "| " + " | ".join(mask) + " |", "|" + "---|" * len(mask),
                  "| " + " | ".join(str(v) for v in mask.values()) + " |"]
    if summary.get("proposer"):
        lines += ["", "Proposer (HRPO steps; reward probes answered by the solver before / after its training):", "",
                  "| solver | step | reward mean | k (correct probes) | n | difficulty | format |",
                  "|---|---|---|---|---|---|---|"]
        for label, result in summary["proposer"].items():
            for s in result.get("steps", []) or [{"step": f"exit {result.get('exit')}"}]:
                lines.append(f"| {label} | {s['step']} | {_cell(s.get('reward_mean'))} | {_cell(s.get('k_mean'))} "
                             f"| {_cell(s.get('n_mean'))} | {_cell(s.get('difficulty_mean'))} "
                             f"| {_cell(s.get('format_mean'))} |")
    lines += ["", "Targets:", ""] + [f"- {'pass' if ok else 'FAIL'}: {name}"
                                     for name, ok in summary.get("verdicts", summary_verdicts(summary)).items()]
    steps = sorted({r["step"] for r in rows})
    if steps:
        lines += ["", "Reward mean per step:", "", "| step | " + " | ".join(LABELS[r] for r in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        by = {(r["run"], r["step"]): r.get("reward_mean") for r in rows}
        lines += [f"| {s} | " + " | ".join(_cell(by.get((run, s))) for run in runs) + " |" for s in steps]
    for run, info in summary.get("runs", {}).items():
        if info.get("log_tail"):
            lines += ["", f"{run}: exit {info.get('exit')}; the log's end:", "", "```", info["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, card: str) -> str:
    """The reward mean per step of every run; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed here: `python benchmarks/learning_curve.py --report-from DIR` draws it"
    figure, axes = plt.subplots(figsize=(7, 4))
    for run, label in LABELS.items():
        run_rows = sorted((r for r in rows if r["run"] == run and r.get("reward_mean") is not None),
                          key=lambda r: r["step"])
        if run_rows:
            axes.plot([r["step"] for r in run_rows], [r["reward_mean"] for r in run_rows], marker=".", label=label)
    axes.set_xlabel("GRPO step")
    axes.set_ylabel("reward mean (exact match)")
    axes.set_title(f"Solver reward per step ({card})")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return ""


def write_report(out: Path, rows: list[dict], summary: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {**summary, "steps": rows}
    summary["verdicts"] = summary_verdicts(summary)
    note = plot(rows, out / "learning_curve.png", summary.get("card", "?"))
    if note:
        summary["plot"] = note
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=1,
                                                 default=str) + "\n")
    (out / "learning_curve.md").write_text(markdown(rows, summary))
