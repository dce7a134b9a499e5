"""benchmarks/learning_curve.py on CPU: the shuffled-reward control through verl's compute_advantage, the
loss-mask check on trajectories in the agent loop's dump format, the report from recorded steps, the plan."""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import learning_curve  # noqa: E402
import learning_report  # noqa: E402

from drzero.rollout.agent_loop import dump_trajectory  # noqa: E402
from drzero.verl import controls  # noqa: E402
from drzero.verl.hf.engine import ResponseLimits  # noqa: E402
from drzero.verl.hrpo import assert_estimator_resolves  # noqa: E402


# -- the shuffled-reward control ------------------------------------------------------------------------------

def test_permutation_keeps_the_multiset_and_moves_rewards_across_the_batch():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    orders = [controls.permuted(torch.arange(12), np.random.default_rng([controls.SHUFFLE_SEED, i]))
              for i in range(5)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(12))
        assert Counter(scores[order].tolist()) == Counter(scores.tolist())
    assert any(order.tolist() != list(range(12)) for order in orders)
    # across the batch: some trajectory gets a reward from outside its GRPO group of 4
    assert any(int(i) // 4 != j // 4 for order in orders for j, i in enumerate(order))


def _batch(scores, group_size):
    from verl import DataProto

    n, length = len(scores), 5
    rewards = torch.zeros(n, length)
    rewards[:, -1] = torch.tensor(scores)
    uids = np.array([f"p{i // group_size}" for i in range(n)], dtype=object)
    return DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": torch.ones(n, length)},
                               non_tensors={"uid": uids})


def test_shuffled_estimator_is_grpo_on_permuted_scores_through_verls_compute_advantage(monkeypatch):
    from omegaconf import OmegaConf
    from verl.trainer.ppo import ray_trainer
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    assert assert_estimator_resolves(controls.SHUFFLED_GRPO) is controls.compute_shuffled_grpo_advantage
    monkeypatch.setattr(controls, "_calls", itertools.count())
    scores = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": True})
    data = ray_trainer.compute_advantage(_batch(scores, 4), adv_estimator=controls.SHUFFLED_GRPO, config=config)
    order = np.random.default_rng([controls.SHUFFLE_SEED, 0]).permutation(8)
    expected_batch = _batch([scores[i] for i in order], 4)
    expected, _ = compute_grpo_outcome_advantage(expected_batch.batch["token_level_rewards"],
                                                 expected_batch.batch["response_mask"],
                                                 expected_batch.non_tensor_batch["uid"])
    assert torch.allclose(data.batch["advantages"], expected)
    # the true rewards stay in the batch (verl logs critic/score from them)
    assert data.batch["token_level_rewards"][:, -1].tolist() == scores
    plain = ray_trainer.compute_advantage(_batch(scores, 4), adv_estimator="grpo", config=config)
    assert not torch.allclose(plain.batch["advantages"], data.batch["advantages"])


# -- the loss mask --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _trajectory(tokenizer):
    """Token ids and mask as verl's tool agent loop builds them: the model's turn (stop token included), the tool
    turn the chat template renders (mask 0), the model's answer."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    call = ids('<tool_call>\n{"name": "search", "arguments": {"query_list": ["Krelzand College"]}}\n</tool_call>'
               "<|im_end|>")
    tool = ids('<|im_start|>user\n<tool_response>\n{"result": "Doc 1 (Title: Krelzand College) The campus lies in '
               'Maimbrairmere."}\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    answer = ids("<answer>Maimbrairmere</answer><|im_end|>")
    return call + tool + answer, [1] * len(call) + [0] * len(tool) + [1] * len(answer), len(tool)


def test_loss_mask_check_on_a_dumped_trajectory(tokenizer, tmp_path):
    ids, mask, tool_tokens = _trajectory(tokenizer)
    assert dump_trajectory(SimpleNamespace(response_ids=ids, response_mask=mask, num_turns=4), str(tmp_path))
    records = learning_report.read_trajectories(tmp_path)
    assert records == [{"response_ids": ids, "response_mask": mask, "num_turns": 4}]
    counts = learning_report.loss_mask_counts(records, tokenizer)
    assert counts["trajectories"] == counts["with_tool_turn"] == 1
    assert counts["tool_turn_tokens"] == tool_tokens and counts["tool_turn_tokens_in_loss"] == 0
    assert 0 < counts["tool_response_tokens"] < tool_tokens and counts["tool_response_tokens_in_loss"] == 0
    assert counts["model_tokens"] == len(ids) - tool_tokens and counts["model_tokens_outside_loss"] == 0


def test_loss_mask_check_counts_tool_tokens_inside_the_loss_and_model_tokens_outside(tokenizer):
    ids, mask, _ = _trajectory(tokenizer)
    start = mask.index(0)
    broken = list(mask)
    broken[start + 5:start + 8] = [1, 1, 1]     # inside the tool response
    broken[0] = 0                               # the model's first token
    counts = learning_report.loss_mask_counts([{"response_ids": ids, "response_mask": broken}], tokenizer)
    assert counts["tool_turn_tokens_in_loss"] == 3 and counts["tool_response_tokens_in_loss"] == 3
    assert counts["model_tokens_outside_loss"] == 1
    summary = {"loss_mask": counts, "steps": []}
    assert not learning_report.summary_verdicts(summary)["no tool-response token in the loss mask"]


def test_dump_is_off_without_a_folder_and_stops_at_its_limit(tmp_path, monkeypatch):
    output = SimpleNamespace(response_ids=[1, 2], response_mask=[1, 0], num_turns=2)
    monkeypatch.delenv("DRZERO_TRAJECTORY_DUMP", raising=False)
    assert not dump_trajectory(output)
    monkeypatch.setenv("DRZERO_TRAJECTORY_DUMP", str(tmp_path))
    monkeypatch.setenv("DRZERO_TRAJECTORY_DUMP_LIMIT", "2")
    monkeypatch.setattr("drzero.rollout.agent_loop._dumped", 0)
    assert [dump_trajectory(output) for _ in range(3)] == [True, True, False]
    assert len(learning_report.read_trajectories(tmp_path)) == 2


# -- the report -----------------------------------------------------------------------------------------------

def _recorded_steps(steps=30):
    rows = []
    for step in range(1, steps + 1):
        for run, reward in (("curve", 0.4 + 0.5 * step / steps), ("shuffled", 0.41 + 0.01 * (step % 3)),
                            ("lr0", 0.42 - 0.01 * (step % 2))):
            rows.append({"run": run, "step": step, "reward_mean": reward, "searches_per_traj": 1.0,
                         "parse_failures_per_traj": 0.0, "answers_per_traj": 1.0, "step_s": 2.0})
    return rows


def test_report_from_recorded_steps(tmp_path):
    rows = _recorded_steps()
    summary = {"card": "NVIDIA H100 80GB HBM3", "command": "python3 benchmarks/learning_curve.py --out o",
               "runs": {"curve": {"exit": 0, "seconds": 120.0}, "shuffled": {"exit": 0, "seconds": 110.0},
                        "lr0": {"exit": 0, "seconds": 100.0}},
               "exact_match_before": {"exact_match": 0.5, "tool_call_rate": 1.0},
               "exact_match_after": {"exact_match": 0.9375, "tool_call_rate": 1.0},
               "loss_mask": {"trajectories": 256, "tool_turn_tokens": 70000, "tool_turn_tokens_in_loss": 0}}
    learning_report.write_report(tmp_path, rows, summary)
    assert learning_report.read_steps(tmp_path / "steps.jsonl") == rows
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert all(saved["verdicts"].values()), saved["verdicts"]
    text = (tmp_path / "learning_curve.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "python3 benchmarks/learning_curve.py --out o" in text
    assert "| GRPO | 30 |" in text and "| shuffled rewards | 30 |" in text and "| learning rate 0 | 30 |" in text
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    change = learning_report.window_change(learning_report.rewards_of(rows, "curve"))
    assert change["change"] == pytest.approx(0.5 * 20 / 30, abs=1e-3)
    # the same files again from the folder alone (for a machine without matplotlib)
    (tmp_path / "learning_curve.png").unlink()
    assert learning_curve.main(["--report-from", str(tmp_path)]) == 0
    assert (tmp_path / "learning_curve.png").exists()


def test_verdicts_fail_for_a_flat_curve_a_missing_run_and_a_moving_control():
    rows = [r for r in _recorded_steps() if r["run"] != "lr0"]
    for r in rows:
        if r["run"] == "curve":
            r["reward_mean"] = 0.4
        else:
            r["reward_mean"] = 0.3 + 0.2 * r["step"] / 30
    verdicts = learning_report.summary_verdicts({"steps": rows})
    assert not any(verdicts.values())


# -- the plan -------------------------------------------------------------------------------------------------

def test_dry_run_prints_the_three_runs(capsys, tmp_path):
    assert learning_curve.main(["--dry-run", "--work", str(tmp_path), "--steps", "30", "--lr", "0.001"]) == 0
    text = capsys.readouterr().out
    runs = {line.split()[1]: next(iter(text.split(line, 1)[1].strip().splitlines()))
            for line in text.splitlines() if line.startswith("run ")}
    assert list(runs) == ["curve", "shuffled", "lr0"]
    assert all("drzero.cli solver --engine hf" in command and "--steps 30" in command for command in runs.values())
    assert "actor_rollout_ref.actor.optim.lr=0.001" in runs["curve"] and "trainer.save_freq=30" in runs["curve"]
    assert f"algorithm.adv_estimator={controls.SHUFFLED_GRPO}" in runs["shuffled"]
    assert "actor_rollout_ref.actor.optim.lr=0.001" in runs["shuffled"] and "trainer.save_freq=-1" in runs["shuffled"]
    assert "actor_rollout_ref.actor.optim.lr=0.0 " in runs["lr0"] + " "
    assert all(f"--checkpoints {tmp_path / name / 'checkpoints'}" in runs[name] for name in runs)
    assert all("+actor_rollout_ref.rollout.custom.hf_max_new_tokens=64" in command for command in runs.values())


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        learning_curve.parse_args(["--steps", "10"])
    with pytest.raises(SystemExit):
        learning_curve.parse_args(["--rollout-n", "1"])


def test_training_questions_pair_a_right_and_a_wrong_answer_of_the_same_relation():
    from drzero.corpus.demo import build_demo_world
    from drzero.tools.tiny_agent import split_questions

    pairs = learning_curve.rl_questions(16)
    _, held_out = split_questions(0)
    assert len(pairs) == 16 and all(q in held_out for q, _ in pairs)
    answers_by_relation = {}
    for q in build_demo_world().questions(1, count=400, seed=0):
        answers_by_relation.setdefault(q.relation, set()).add(q.answer)
    for question, wrong in pairs:
        assert wrong != question.answer and wrong in answers_by_relation[question.relation]
        assert wrong not in {q.answer for q, _ in pairs}
    conversations = learning_curve.two_answer_conversations(pairs)
    assert len(conversations) == 32
    for (question, wrong), right_turns, wrong_turns in zip(pairs, conversations[::2], conversations[1::2]):
        assert right_turns[-1]["content"] == f"<answer>{question.answer}</answer>"
        assert wrong_turns[-1]["content"] == f"<answer>{wrong}</answer>"
        assert right_turns[:-1] == wrong_turns[:-1]
        assert '"query_list"' in right_turns[-3]["content"] and right_turns[-2]["role"] == "tool"


def test_the_hf_engine_turn_limit_caps_every_call():
    limits = ResponseLimits(prompt_length=512, response_length=896, max_model_len=4096, turn_limit=96)
    assert limits.max_new_tokens(300) == 96
    assert limits.max_new_tokens(300, requested=40) == 40
    assert ResponseLimits(512, 896, 4096).max_new_tokens(300) == 896


def test_reports_of_two_commands_merge(tmp_path):
    rows = _recorded_steps()
    first, second = tmp_path / "first", tmp_path / "second"
    learning_report.write_report(first, [r for r in rows if r["run"] != "lr0"],
                                 {"card": "H100", "runs": {"curve": {"exit": 0}, "shuffled": {"exit": 0},
                                                           "lr0": {"skipped": "40 s left"}},
                                  "loss_mask": {"tool_turn_tokens": 9, "tool_turn_tokens_in_loss": 0}})
    learning_report.write_report(second, [r for r in rows if r["run"] == "lr0"],
                                 {"card": "H100", "runs": {"lr0": {"exit": 0, "seconds": 99.0}}})
    assert learning_curve.main(["--report-from", str(first), str(second)]) == 0
    saved = json.loads((first / "summary.json").read_text())
    assert saved["runs"]["lr0"] == {"exit": 0, "seconds": 99.0} and all(saved["verdicts"].values())
    assert len(learning_report.read_steps(first / "steps.jsonl")) == len(rows)
