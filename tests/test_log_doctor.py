"""The log doctor against log excerpts shaped like what each failure prints on Modal (written for these tests)."""

from __future__ import annotations

import pytest

from drzero.tools import log_doctor as doctor

EXCERPTS = {
    "micro batch size": """\
[challenger] (TaskRunner pid=812) Traceback (most recent call last):
[challenger]   File "/usr/local/lib/python3.12/dist-packages/verl/workers/config/actor.py", line 211, in __post_init__
[challenger] ValueError: [actor_rollout_ref.rollout] Please set at least one of 'actor_rollout_ref.rollout.log_prob_micro_batch_size' or 'actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu'.
""",
    "hydra: key not in config": """\
[solver] running verl with 41 overrides
[solver] Could not override 'actor_rollout_ref.model.override_config.attn_implementation'.
[solver] To append to your config use +actor_rollout_ref.model.override_config.attn_implementation=sdpa
""",
    "hydra: key already in config": """\
[train] [evolve] iteration 1: challenger
[challenger] hydra.errors.ConfigCompositionException: Could not append to config. An item is already at 'trainer.total_training_steps'.
""",
    "missing data file": """\
[solver] (TaskRunner pid=977) dataset len: 2048
[solver] FileNotFoundError: [Errno 2] No such file or directory: '/corpus/data/solver_iter2_val.parquet'
""",
    "sglang version drift": """\
[challenger]   File "/usr/local/lib/python3.12/dist-packages/verl/workers/rollout/sglang_rollout/async_sglang_server.py", line 30, in <module>
[challenger] ImportError: cannot import name 'ServerArgs' from 'sglang.srt.server_args_v2' (unknown location)
""",
    "CUDA out of memory": """\
[challenger] (WorkerDict pid=3310) [rank3]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.62 GiB. GPU 3 has a total capacity of 79.19 GiB of which 1.02 GiB is free.
""",
    "NCCL error": """\
[solver] (WorkerDict pid=4410) [rank5]:[E1201 03:12:44.118 ProcessGroupNCCL.cpp:632] [Rank 5] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=8812, OpType=ALLREDUCE) ran for 600046 milliseconds before timing out.
""",
    "stopped (SIGTERM / preemption)": """\
[train] step:31 - critic/score/mean:0.412
[train] [evolve] received SIGTERM: stopping the services and verl
[modal] drzero evolve exited with 143; Modal retries it
""",
    "W&B key missing": """\
[solver] wandb.errors.UsageError: api_key not configured (no-tty). call wandb.login(key=[your_api_key])
""",
}


@pytest.mark.parametrize("name", list(EXCERPTS))
def test_each_known_failure_is_found_in_its_excerpt_with_a_one_line_fix(name):
    findings = doctor.diagnose(EXCERPTS[name].splitlines())
    assert findings and findings[0].failure.name == name
    assert "\n" not in findings[0].fix and len(findings[0].fix) < 300


def test_fixes_name_the_key_or_file_the_log_shows():
    fix = lambda name: doctor.diagnose(EXCERPTS[name].splitlines())[0].fix  # noqa: E731
    assert fix("micro batch size").startswith(
        "set it after `--`: actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4")
    assert "write +actor_rollout_ref.model.override_config.attn_implementation=VALUE" in fix("hydra: key not in config")
    assert "drop the leading + (write trainer.total_training_steps=VALUE" in fix("hydra: key already in config")
    assert fix("missing data file").startswith("/corpus/data/solver_iter2_val.parquet is not there")
    assert "drzero memory" in fix("CUDA out of memory")
    assert "backends.modal resume" in fix("stopped (SIGTERM / preemption)")


def test_healthy_lines_are_not_failures():
    healthy = """\
[challenger] step:12 - actor/pg_loss:0.031 - critic/score/mean:0.38 - response_length/mean:812.4
[retriever] INFO:     127.0.0.1:51234 - "POST /retrieve HTTP/1.1" 200 OK
[sglang] [2026-12-01 02:11:09 DP3 TP0] Decode batch. #running-req: 41, #token: 90211, gen throughput (token/s): 5120.33
[solver] memory: actor 41.2 GiB, rollout 28.0 GiB, headroom 10% of 79.1 GiB
[modal] copied /corpus/chromadb to /tmp/chromadb in 12.4 s
""".splitlines()
    assert doctor.diagnose(healthy) == []
    assert doctor.excerpts(healthy).startswith("no known failure")


def test_annotate_keeps_every_line_and_its_prefix_and_adds_the_fix_after_a_failure():
    lines = EXCERPTS["CUDA out of memory"].splitlines() + ["[challenger] step:13 - done"]
    out = list(doctor.annotate(lines))
    assert out[0] == lines[0] and out[2] == lines[1] and out[1].startswith(">>> CUDA out of memory: run `drzero memory")
    assert doctor.service(lines[0]) == "challenger" and doctor.service("2026-12-01T02:11:09.123Z [solver] x") == "solver"


def test_errors_shows_context_and_each_fix_once():
    log = (["[solver] loading"] * 5 + EXCERPTS["CUDA out of memory"].splitlines() * 3
           + EXCERPTS["stopped (SIGTERM / preemption)"].splitlines())
    text = doctor.excerpts(log, context=2)
    assert text.count("== CUDA out of memory") == 1 and text.count("== stopped") == 1
    block = text.split("\n\n")[0].splitlines()
    assert block[0] == "== CUDA out of memory (line 6)" and len(block) == 1 + 3 + 1 and block[-1].startswith("  fix: ")
