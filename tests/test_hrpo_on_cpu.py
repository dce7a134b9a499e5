"""HRPO through verl 0.7.1 on CPU: hop-grouped advantages, and the wrapper live in the process that runs fit().

1. Numerics go through verl's own ``ray_trainer.compute_advantage`` (patched) on a real ``DataProto``.
2. The real ``run_ppo`` starts a real TaskRunner Ray actor (a subclass of ours) on a local CPU Ray;
   verl's ``TaskRunner.run`` really runs (config validation, tokenizer, parquet datasets, trainer and
   dataloaders). Only ``RayPPOTrainer.init_workers`` (GPU worker groups) and ``RayPPOTrainer.fit``
   (the training loop) are stubbed, inside the actor, to record what the process that runs ``fit()`` sees.
3. The preflight check for ``algorithm.adv_estimator``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from drzero.verl import hrpo
from verl_harness import compose_ppo_config

EPS = 1e-6  # verl's GRPO epsilon


def expected_hrpo(scores, groups, norm_by_std=True) -> np.ndarray:
    """GRPO normalization within ``groups``, written independently of verl (numpy, unbiased std).

    verl's convention for a one-sample group: mean 0, std 1.
    """
    scores, groups = np.asarray(scores, dtype=np.float64), np.asarray(groups, dtype=object)
    out = np.empty_like(scores)
    for g in set(groups.tolist()):
        members = groups == g
        values = scores[members]
        mean, std = (values.mean(), values.std(ddof=1)) if len(values) > 1 else (0.0, 1.0)
        out[members] = (values - mean) / (std + EPS) if norm_by_std else values - mean
    return out


# 12 samples, rollout.n = 1 (unique uids), 4 hop groups of uneven size (5/3/3/1, the 1 a singleton).
HOPS = [1, 2, 1, 3, 1, 2, 4, 1, 3, 2, 1, 3]
SCORES = [0.9, 0.1, 0.3, 0.7, 0.0, 0.6, 0.8, 1.0, 0.2, 0.4, 0.5, 0.9]
RESPONSE_LENGTH = 6


def proposer_batch(uids=None):
    """A DataProto as fit() has it at compute_advantage: outcome score on the last valid response token."""
    from verl import DataProto

    n = len(SCORES)
    lengths = [1 + (3 * i) % RESPONSE_LENGTH for i in range(n)]          # 1..6 valid tokens, right padding
    mask = torch.zeros(n, RESPONSE_LENGTH)
    rewards = torch.zeros(n, RESPONSE_LENGTH)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
        rewards[i, length - 1] = SCORES[i]
    uids = uids if uids is not None else [f"uid-{i}" for i in range(n)]
    return DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"data_source": np.array([f"search_zero_{h}" for h in HOPS], dtype=object),
                     "uid": np.array(uids, dtype=object)})


@pytest.fixture
def wrapped(monkeypatch):
    """Install the wrapper in this process; monkeypatch restores verl's original afterwards."""
    from verl.trainer.ppo import ray_trainer

    original = ray_trainer.compute_advantage
    assert not getattr(original, hrpo.MARKER, False)
    monkeypatch.setattr(ray_trainer, "compute_advantage", original)   # restored at teardown
    wrapper = hrpo.install_hrpo_wrapper()
    return original, wrapper


def test_hrpo_advantages_through_verls_compute_advantage(wrapped):
    from verl.trainer.ppo import core_algos, ray_trainer

    original, wrapper = wrapped
    assert ray_trainer.compute_advantage is wrapper and hrpo.hrpo_wrapper_installed()
    algo = OmegaConf.create({"adv_estimator": "hrpo", "norm_adv_by_std_in_grpo": True, "gamma": 1.0, "lam": 1.0})

    data = proposer_batch()
    uids_before = data.non_tensor_batch["uid"].copy()
    out = ray_trainer.compute_advantage(data, adv_estimator="hrpo", gamma=1.0, lam=1.0, num_repeat=1,
                                        norm_adv_by_std_in_grpo=True, config=algo)   # as fit() calls it
    mask = out.batch["response_mask"]
    advantages = out.batch["advantages"]
    want = torch.tensor(expected_hrpo(SCORES, [f"search_zero_{h}" for h in HOPS]), dtype=torch.float32)
    torch.testing.assert_close(advantages, want[:, None] * mask, atol=1e-5, rtol=1e-5)   # every valid token
    assert torch.all(advantages[mask == 0] == 0)
    torch.testing.assert_close(out.batch["returns"], advantages)
    assert list(out.non_tensor_batch["uid"]) == list(uids_before)           # the batch's uids are untouched
    assert torch.equal(torch.tensor(hrpo.hop_group_index(out) == "search_zero_1"),
                       torch.tensor([h == 1 for h in HOPS]))
    # Hop groups of 5 and 3 are really normalized: mean 0, unbiased std 1.
    per_sample = advantages.sum(-1) / mask.sum(-1)
    group1 = per_sample[torch.tensor([h == 1 for h in HOPS])]
    assert abs(group1.mean().item()) < 1e-5 and abs(group1.std().item() - 1) < 1e-4

    # norm_adv_by_std_in_grpo=False (Dr. GRPO): centred only.
    centred = ray_trainer.compute_advantage(proposer_batch(), adv_estimator="hrpo",
                                            norm_adv_by_std_in_grpo=False, config=algo)
    want_centred = torch.tensor(expected_hrpo(SCORES, [f"search_zero_{h}" for h in HOPS], norm_by_std=False),
                                dtype=torch.float32)
    torch.testing.assert_close(centred.batch["advantages"], want_centred[:, None] * mask, atol=1e-5, rtol=1e-5)

    # What registration alone gives: verl's own path groups by uid; unique uids -> singletons -> mean 0 / std 1,
    # i.e. the raw score (REINFORCE). Our estimator flags that pattern; the wrapper's result differs from it.
    with pytest.warns(RuntimeWarning, match="one sample"):
        per_uid = original(proposer_batch(), adv_estimator="hrpo", norm_adv_by_std_in_grpo=True, config=algo)
    raw = torch.tensor(SCORES)[:, None] * mask / (1 + EPS)
    torch.testing.assert_close(per_uid.batch["advantages"], raw, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(per_uid.batch["advantages"], advantages, atol=1e-2)

    # Every other estimator goes to the original unchanged (grpo with real prompt groups of 3).
    uids = [f"prompt-{i // 3}" for i in range(len(SCORES))]
    through_wrapper = ray_trainer.compute_advantage(proposer_batch(uids), adv_estimator="grpo",
                                                    norm_adv_by_std_in_grpo=True, config=algo)
    direct = original(proposer_batch(uids), adv_estimator="grpo", norm_adv_by_std_in_grpo=True, config=algo)
    assert torch.equal(through_wrapper.batch["advantages"], direct.batch["advantages"])
    torch.testing.assert_close(direct.batch["advantages"],
                               torch.tensor(expected_hrpo(SCORES, uids), dtype=torch.float32)[:, None] * mask,
                               atol=1e-5, rtol=1e-5)
    for name in ("rloo", "reinforce_plus_plus"):
        a = ray_trainer.compute_advantage(proposer_batch(uids), adv_estimator=name, config=algo)
        b = original(proposer_batch(uids), adv_estimator=name, config=algo)
        assert torch.equal(a.batch["advantages"], b.batch["advantages"])

    # Idempotent: installing again, wrapping the wrapper, registering again change nothing.
    assert hrpo.install_hrpo_wrapper() is wrapper and ray_trainer.compute_advantage is wrapper
    assert hrpo.compute_advantage_by_hop(wrapper) is wrapper
    assert wrapper.__drzero_original__ is original
    assert hrpo.register_hrpo() is core_algos.get_adv_estimator_fn("hrpo") is hrpo.compute_hrpo_outcome_advantage


def test_hop_group_index_requires_data_source():
    data = proposer_batch()
    assert list(hrpo.hop_group_index(data)) == [f"search_zero_{h}" for h in HOPS]
    data.non_tensor_batch.pop("data_source")
    with pytest.raises(KeyError, match="data_source"):
        hrpo.hop_group_index(data)


def _probe_task_runner(record_path: str):
    """A subclass of HRPOTaskRunner, defined in a function so that Ray's cloudpickle ships it by value.

    Inside the actor, before verl's TaskRunner.run, it replaces only RayPPOTrainer.init_workers (GPU
    worker groups) and RayPPOTrainer.fit (the loop) with recorders; everything else in run() is verl's.
    """

    class ProbeTaskRunner(hrpo.HRPOTaskRunner):
        def run(self, config):
            import uuid

            import numpy as np
            import torch
            from verl import DataProto
            from verl.trainer.ppo import ray_trainer

            record = {"actor_pid": os.getpid(), "marker_before_run": hrpo.hrpo_wrapper_installed()}

            def init_workers(trainer):
                record["init_workers_pid"] = os.getpid()

            def fit(trainer):
                record["fit_pid"] = os.getpid()
                record["marker_at_fit"] = bool(getattr(ray_trainer.compute_advantage, hrpo.MARKER, False))
                record["roles"] = sorted(str(role) for role in trainer.role_worker_mapping)
                # fit()'s own steps on the first real batch of the parquet: uids, then compute_advantage
                # looked up by name on the module, called with fit()'s arguments. Score = extra_info.index.
                batch = DataProto.from_single_dict(next(iter(trainer.train_dataloader)))
                batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))],
                                                         dtype=object)
                scores = torch.tensor([float(e["index"]) for e in batch.non_tensor_batch["extra_info"]])
                batch.batch["response_mask"] = torch.ones(len(batch), 3)
                batch.batch["token_level_rewards"] = torch.zeros(len(batch), 3)
                batch.batch["token_level_rewards"][:, -1] = scores
                algorithm = trainer.config.algorithm
                batch = ray_trainer.compute_advantage(
                    batch, adv_estimator=algorithm.adv_estimator, gamma=algorithm.gamma, lam=algorithm.lam,
                    num_repeat=trainer.config.actor_rollout_ref.rollout.n,
                    norm_adv_by_std_in_grpo=algorithm.get("norm_adv_by_std_in_grpo", True), config=algorithm)
                record["data_source"] = [str(s) for s in batch.non_tensor_batch["data_source"]]
                record["scores"] = scores.tolist()
                record["advantages"] = batch.batch["advantages"][:, 0].tolist()

            ray_trainer.RayPPOTrainer.init_workers = init_workers
            ray_trainer.RayPPOTrainer.fit = fit
            try:
                return super().run(config)
            finally:
                with open(record_path, "w") as f:
                    json.dump(record, f)

    return ProbeTaskRunner


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    """A tiny Qwen2 model dir (tokenizer + weights) and proposer-style train/val parquet (8 rows, 4 hops)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from drzero.tools.tiny_model import TinyModelConfig, run_tiny_model

    root = tmp_path_factory.mktemp("hrpo_run")
    model = run_tiny_model(TinyModelConfig(out=str(root / "model")))
    rows = [{"data_source": f"search_zero_{i % 4 + 1}",
             "prompt": [{"role": "user", "content": f"Write a {i % 4 + 1}-hop question about document {i}."}],
             "ability": "search",
             "reward_model": {"style": "rule", "ground_truth": {"target": None}},
             "extra_info": {"index": i, "hops": i % 4 + 1}} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:4]), root / "val.parquet")
    return root, model


def test_wrapper_is_live_in_the_taskrunner_actor_that_runs_fit(tiny_run_inputs, wrapped, monkeypatch):
    import ray

    root, model = tiny_run_inputs
    record_path = root / "record.json"
    config = compose_ppo_config([
        "algorithm.adv_estimator=hrpo",
        f"data.train_files={root / 'train.parquet'}", f"data.val_files={root / 'val.parquet'}",
        "data.train_batch_size=8", "data.max_prompt_length=128", "data.max_response_length=32",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model}", "actor_rollout_ref.rollout.name=sglang",
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "trainer.logger=[console]", "trainer.total_epochs=1",
        # run_ppo's own ray.init: 2 CPUs, no dashboard
        "ray_kwargs.ray_init.num_cpus=2", "+ray_kwargs.ray_init.include_dashboard=false",
    ])
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short: Ray's socket paths have a length limit
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf_datasets"))   # the actor inherits the driver's env
    assert hrpo.hrpo_wrapper_installed()        # patched here, in the driver ...
    assert not ray.is_initialized()
    try:
        hrpo.run_ppo_with_hrpo(config, task_runner_cls=_probe_task_runner(str(record_path)))
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    record = json.loads(record_path.read_text())
    assert record["fit_pid"] != os.getpid()
    assert record["fit_pid"] == record["init_workers_pid"] == record["actor_pid"]
    assert record["marker_before_run"] is False   # ... which does not reach the actor,
    assert record["marker_at_fit"] is True        # where HRPOTaskRunner.run installed it before fit()
    assert record["roles"]                        # verl's TaskRunner.run really built the role mapping
    # compute_advantage, as fit() calls it in the actor, grouped the parquet's batch by data_source.
    assert sorted(record["data_source"]) == sorted(f"search_zero_{i % 4 + 1}" for i in range(8))
    want = expected_hrpo(record["scores"], record["data_source"])
    np.testing.assert_allclose(record["advantages"], want, atol=1e-5)
    assert not np.allclose(record["advantages"], record["scores"], atol=1e-2)


def test_assert_estimator_resolves():
    assert hrpo.assert_estimator_resolves("hrpo") is hrpo.compute_hrpo_outcome_advantage
    assert hrpo.assert_estimator_resolves("grpo") is not None
    with pytest.raises(ValueError) as excinfo:
        hrpo.assert_estimator_resolves("hrpoo")
    message = str(excinfo.value)
    assert "'hrpoo'" in message and "algorithm.adv_estimator=hrpo" in message and "\n" not in message
