"""The Lightning engine: paired data streams, 2-process DDP equal to 1 process, bitwise resume after
kill -9, logged metrics, checkpoints."""

import csv
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from bilevel_dist import algorithms
from bilevel_dist.lightning.data import StepSampler
from bilevel_dist.oracles import Chunks
from bilevel_dist.recipes.data_denoising import Denoising, DigitsData

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import ddp_fit  # noqa: E402


def trainer(**kwargs):
    options = dict(
        default_root_dir=tempfile.mkdtemp(prefix="bilevel_dist_test_"),  # run outputs stay out of the repo
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    return L.Trainer(**{**options, **kwargs})


def test_rank_streams_are_disjoint_shards_and_replay_in_one_process():
    data = DigitsData(inner_batch_size=16, outer_batch_size=10, shards=2, per_sample=True)
    one = data.paired_steps()
    ranks = []
    for rank in range(2):
        steps = data.paired_steps()
        steps.rank, steps.world = rank, 2
        ranks.append(steps)
    for t in (0, 5, 71, 200):  # 71 steps make one epoch of a 573-row shard
        inner = [r[t]["inner"]["index"] for r in ranks]
        assert all(bool((ids % 2 == rank).all()) for rank, ids in enumerate(inner))
        assert len(set(torch.cat(inner).tolist())) == 32
        assert torch.equal(one[t]["inner"]["index"], torch.cat(inner))
        assert torch.equal(one[t]["outer"]["index"], torch.cat([r[t]["outer"]["index"] for r in ranks]))
        assert torch.equal(one[t]["inner"]["x"], data.x_train[one[t]["inner"]["index"]])
    epoch = torch.cat([ranks[0][t]["inner"]["index"] for t in range(len(ranks[0]))])
    assert len(set(epoch.tolist())) == len(epoch) == 35 * 16  # one epoch draws each sample once


def test_replicated_stream_splits_one_global_batch():
    data = DigitsData(inner_batch_size=16, outer_batch_size=10, per_sample=False)
    wide = DigitsData(inner_batch_size=32, outer_batch_size=20, per_sample=False).paired_steps()
    steps = [data.paired_steps() for _ in range(2)]
    for rank, s in enumerate(steps):
        s.rank, s.world = rank, 2
        s.inner_stream = wide.inner_stream
        s.outer_stream = wide.outer_stream
    for t in (0, 40):
        assert torch.equal(wide[t]["inner"]["index"], torch.cat([s[t]["inner"]["index"] for s in steps]))


def test_step_sampler_continues_from_the_position_to_the_epoch_end():
    position = [0]
    sampler = StepSampler(5, lambda: position[0])
    assert list(sampler) == [0, 1, 2, 3, 4]
    position[0] = 7
    assert list(sampler) == [7, 8, 9]
    own = StepSampler(4)
    assert list(own) == [0, 1, 2, 3] and list(own) == [4, 5, 6, 7]


def two_process_run(script, names, tmp_path):
    """Runs ``script`` on 2 DDP processes; the steps each rank saved, by run name."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), str(tmp_path), "2"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in range(2)] for name in names}


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_and_naive_penalty_differs(tmp_path):
    runs = two_process_run("ddp_fit.py", ddp_fit.RUNS, tmp_path)
    worst = {}
    for name, ranks in runs.items():
        reference_name = "penalty" if name == "naive_penalty" else name
        reference = ddp_fit.fit(reference_name, devices=1, shards=2)
        assert len(ranks[0]) == len(ranks[1]) == len(reference) == ddp_fit.STEPS
        worst[name] = 0.0
        for step, (r0, r1, one) in enumerate(zip(*ranks, reference, strict=True)):
            for level in ("outer", "inner"):
                for key, value in r0["full"][level].items():
                    assert torch.equal(value, r1["full"][level][key]), (name, step, key)
                    worst[name] = max(worst[name], float((value - one["full"][level][key]).abs().max()))
            assert not r0["wrapped"] and not r1["wrapped"]  # DDP's strategy, without DDP's wrapper
            for key, value in r0["own"]["inner"].items():  # the model is replicated: identical on every rank
                assert torch.equal(value, r1["own"]["inner"][key])
            sharded = ddp_fit.RUNS[name][1]
            own = [r["own"]["outer"]["logit"] for r in (r0, r1)]
            if sharded:  # each rank keeps only the weights of the samples it owns
                assert [len(w) for w in own] == [574, 573]
                assert torch.equal(own[0], r0["full"]["outer"]["logit"][0::2])
                assert bool((r0["ids"] % 2 == 0).all()) and bool((r1["ids"] % 2 == 1).all())
            else:
                assert torch.equal(own[0], own[1]) and len(own[0]) == 1147
    print("max |2 processes - 1 process|", worst)
    saved = torch.load(tmp_path / "aid.ckpt", weights_only=True)
    last = torch.load(tmp_path / "aid_rank0.pt", weights_only=True)[-1]["full"]
    assert torch.equal(saved["bilevel"]["outer"]["logit"], last["outer"]["logit"])  # all 1147 rows
    resumed = Denoising.load_from_checkpoint(tmp_path / "aid.ckpt")  # one process reads a 2-rank checkpoint
    assert torch.equal(resumed.outer["logit"], last["outer"]["logit"])
    assert torch.equal(resumed.inner["1.weight"], last["inner"]["1.weight"])
    for name in ("aid", "aid_replicated", "soba", "penalty"):
        assert worst[name] < 1e-6, (name, worst[name])
    assert worst["naive_penalty"] > 1e-2  # squaring each rank's own gradient is a different method


def _fit_cli(config, cwd, *extra, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bilevel_dist.cli", "fit", "--config", str(config), *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
    )


RESUME_CONFIG = """
seed_everything: 0
model:
  class_path: bilevel_dist.recipes.data_denoising.Denoising
  init_args:
    algorithm: {name: soba, inner_lr: 0.5, outer_lr: 20.0}
data:
  class_path: bilevel_dist.recipes.data_denoising.DigitsData
  init_args: {inner_batch_size: 64, outer_batch_size: 50}
trainer:
  max_steps: 60
  precision: 64-true
  val_check_interval: 20
  check_val_every_n_epoch: null
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:%s
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: checkpoints, save_last: true, every_n_train_steps: 10, save_top_k: -1}
"""
KILL = "\n    - class_path: kill_at.KillAt\n      init_args: {step: 37}"


def _tree_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def _last_val(path):
    rows = [r for r in csv.DictReader(open(path)) if r.get("val_accuracy")]
    return rows[-1]


@pytest.mark.slow
def test_kill9_then_resume_from_last_checkpoint_is_bitwise_equal(tmp_path):
    (tmp_path / "fit.yaml").write_text(RESUME_CONFIG % "")
    (tmp_path / "kill.yaml").write_text(RESUME_CONFIG % KILL)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    assert _fit_cli(tmp_path / "fit.yaml", whole).returncode == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    killed = _fit_cli(tmp_path / "kill.yaml", broken, env=env)
    assert killed.returncode == -signal.SIGKILL
    saved = torch.load(broken / "checkpoints/last.ckpt", weights_only=True)  # intact after the kill
    assert saved["global_step"] == 30
    resumed = _fit_cli(tmp_path / "fit.yaml", broken, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(broken / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 60
    assert _tree_equal(a["state_dict"], b["state_dict"])
    assert _tree_equal(a["bilevel"], b["bilevel"])  # per-sample weights, SOBA's v, t, RNG
    final_whole = _last_val(whole / "logs/lightning_logs/version_0/metrics.csv")
    final_resumed = _last_val(broken / "logs/lightning_logs/version_1/metrics.csv")
    assert final_whole["step"] == final_resumed["step"] == "59"
    for key in ("val_accuracy", "val_outer_loss"):
        assert float(final_whole[key]) == float(final_resumed[key])
    assert float(final_whole["val_accuracy"]) > 0.85
    print("final", final_whole, final_resumed)


def test_every_step_logs_the_algorithm_metrics_and_losses(tmp_path):
    data = DigitsData(inner_batch_size=64, outer_batch_size=50)
    model = Denoising(algorithm={"name": "penalty", "inner_lr": 0.2, "outer_lr": 20.0, "gamma": 5.0})
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    fit = trainer(max_steps=6, logger=logger, log_every_n_steps=1)
    fit.fit(model, data)
    every = list(csv.DictReader(open(glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)[0])))
    rows = [r for r in every if r["outer_loss"]]
    assert [int(r["step"]) for r in rows] == list(range(6))
    final = [r for r in every if r.get("summary/method")]  # the end-of-fit summary row
    assert len(final) == 1 and float(final[0]["summary/method"]) == pytest.approx(model.summary["method"])
    for key in ("outer_loss", "inner_loss", "inner_grad_norm", "hypergrad_norm", "penalty_gamma", "samples_per_sec"):
        values = [float(r[key]) for r in rows]
        assert all(v > 0 and v == v for v in values), key
    assert float(rows[0]["penalty_gamma"]) == pytest.approx(5.0)
    assert set(fit.progress_bar_metrics) >= {"outer_loss", "samples_per_sec"}
    # the logged outer loss is the clean-validation loss at the variables after the step
    last = data.paired_steps()[5]["outer"]
    with torch.no_grad():
        expected = model.outer_loss(
            model.inner, model.outer, {k: v.double() for k, v in last.items()} | {"y": last["y"]}
        )
    assert float(rows[-1]["outer_loss"]) == pytest.approx(float(expected), rel=1e-12)


def test_tensorboard_and_offline_wandb_receive_the_same_metrics(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = DigitsData(inner_batch_size=64, outer_batch_size=50)
    model = Denoising(algorithm={"name": "soba", "inner_lr": 0.5, "outer_lr": 20.0})
    tb = TensorBoardLogger(tmp_path / "tb")
    wb = WandbLogger(project="bilevel-test", save_dir=str(tmp_path), offline=True)
    fit = trainer(max_steps=4, logger=[tb, wb], log_every_n_steps=1)
    fit.fit(model, data)
    summary = float(wb.experiment.summary["outer_loss"])
    wb.experiment.finish()
    import wandb

    wandb.teardown()  # stops the service process, which owns the writer of the offline run file
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    scalars = events.Scalars("outer_loss")
    assert [e.step for e in scalars] == [0, 1, 2, 3]
    assert scalars[0].value == pytest.approx(float(fit.progress_bar_metrics["outer_loss"]), rel=1e-6)
    assert summary == pytest.approx(scalars[-1].value, rel=1e-6)
    runs = glob.glob(f"{tmp_path}/wandb/offline-run-*/run-*.wandb")
    assert len(runs) == 1
    keys = (b"outer_loss", b"hypergrad_norm", b"linear_residual", b"samples_per_sec", b"weights_histogram")
    deadline = time.monotonic() + 60
    record = Path(runs[0]).read_bytes()  # the offline run holds the history, ready for `wandb sync`
    while not all(key in record for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)  # a loaded machine may still be flushing the file after teardown
        record = Path(runs[0]).read_bytes()
    for key in keys:
        assert key in record


def test_validate_test_and_load_from_checkpoint(tmp_path):
    data = DigitsData(inner_batch_size=64, outer_batch_size=50)
    model = Denoising(algorithm={"name": "aid", "inner_steps": 5, "outer_lr": 10.0})
    fit = trainer(max_steps=40, default_root_dir=tmp_path, enable_checkpointing=True)
    fit.fit(model, data)
    path = tmp_path / "final.ckpt"
    fit.save_checkpoint(path)
    tested = fit.test(model, data, verbose=False)[0]
    weight, bias = model.inner["1.weight"], model.inner["1.bias"]  # Flatten, then Linear
    expected = ((data.x_test.to(weight) @ weight.T + bias).argmax(1) == data.y_test).double().mean()
    assert tested["test_accuracy"] == pytest.approx(float(expected))
    assert model.summary["method"] == pytest.approx(float(expected))
    assert tested["test_accuracy"] > 0.8
    loaded = Denoising.load_from_checkpoint(path)
    validated = trainer(limit_val_batches=1.0).validate(loaded, data, verbose=False)[0]
    assert validated["val_accuracy"] == pytest.approx(
        trainer(limit_val_batches=1.0).validate(model, data, verbose=False)[0]["val_accuracy"]
    )
    assert torch.equal(loaded.outer["logit"], model.outer["logit"].to(loaded.outer["logit"].dtype))


def test_bf16_mixed_precision_trains(tmp_path):
    torch.set_default_dtype(torch.float32)  # the conftest's float64 default would outrank "32-true"
    data = DigitsData(inner_batch_size=64, outer_batch_size=50)
    accuracy = {}
    for precision in ("32-true", "bf16-mixed"):
        model = Denoising(algorithm={"name": "soba", "inner_lr": 0.5, "outer_lr": 20.0})
        fit = trainer(max_steps=60, precision=precision)
        fit.fit(model, data)
        accuracy[precision] = fit.test(model, data, verbose=False)[0]["test_accuracy"]
    assert accuracy["bf16-mixed"] > 0.8
    assert abs(accuracy["bf16-mixed"] - accuracy["32-true"]) < 0.05


@pytest.mark.parametrize("name", sorted(algorithms.REGISTRY))
def test_module_steps_equal_the_bare_algorithm_loop(name):
    data = DigitsData(inner_batch_size=64, outer_batch_size=50)
    model = Denoising(algorithm={"name": name})
    trainer(max_steps=4).fit(model, data)
    steps = data.paired_steps()
    from_data = data.algorithm_data(algorithms.REGISTRY[name].data_needs)  # what the module was given
    assert from_data == {"saba": {"n_inner": 1147, "n_outer": 150}}.get(name, from_data)
    bare = algorithms.get(name, problem=model.problem, **from_data)
    outer, inner = model.configure_variables()
    state = bare.init(outer, inner)
    double = lambda batch: {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}  # noqa: E731
    if name in ("srba", "vrbo"):
        bare.full_batches = tuple(Chunks((double(b), w) for b, w in chunks) for chunks in from_data["full_batches"])
    for t in range(4):
        state, _ = bare.step(state, double(steps[t]["inner"]), double(steps[t]["outer"]))
    for level in ("outer", "inner"):
        for key, value in state[level].items():
            assert torch.equal(model.state[level][key], value), (name, key)


def test_module_from_callables_matches_the_closed_form_direction(tmp_path):
    """``BilevelModule(inner_loss=..., outer_loss=..., variables=...)`` on ridge regression: one
    AID step with an exact inner solve moves x along the closed-form hypergradient."""
    from bilevel_dist.lightning import BilevelModule, TensorData
    from bilevel_dist.problems import RidgeRegression

    ridge = RidgeRegression.make(n_train=64, n_val=32, features=4)
    model = BilevelModule(
        {"name": "aid", "inner_steps": 300, "inner_lr": 0.5, "linear_iters": 20, "outer_lr": 0.1},
        inner_loss=lambda w, x, batch: ridge.inner_loss(w, x),
        outer_loss=lambda w, x, batch: ridge.outer_loss(w, x),
        variables=lambda: ({"log_lambda": torch.zeros(4)}, {"w": torch.zeros(4)}),
    )
    start = {"log_lambda": torch.zeros(4)}
    expected = ridge.hypergradient(start)["log_lambda"]
    path = tmp_path / "ridge.pt"  # the losses hold their data: the batches only count samples
    torch.save({"train": {"i": torch.arange(64.0)}, "val": {"i": torch.arange(32.0)}}, path)
    data = TensorData(str(path), inner_batch_size=64, outer_batch_size=32)
    trainer(max_steps=1).fit(model, data)
    step = start["log_lambda"] - model.outer["log_lambda"]
    assert torch.allclose(step, 0.1 * expected, rtol=1e-8, atol=1e-12)


def test_data_follows_the_model_sharding_and_refuses_a_contradiction():
    data = DigitsData()
    trainer(max_steps=1).fit(Denoising(algorithm={"name": "soba"}), data)
    assert data.per_sample is True
    replicated = DigitsData()
    trainer(max_steps=1).fit(Denoising(algorithm={"name": "soba"}, shard_weights=False), replicated)
    assert replicated.per_sample is False
    with pytest.raises(ValueError, match="per_sample=False but the model shards per-sample variables"):
        trainer(max_steps=1).fit(Denoising(algorithm={"name": "soba"}), DigitsData(per_sample=False))


import tasks_fit  # noqa: E402


@pytest.mark.slow
def test_batched_lower_levels_on_two_processes_equal_one(tmp_path):
    """64 per-task heads: persistent rows sharded across 2 DDP ranks, or started afresh every step,
    replay the 1-process run (shards=2) to rounding; the outer batch holds the inner batch's tasks."""
    worst = {}
    for name, ranks in two_process_run("tasks_fit.py", tasks_fit.RUNS, tmp_path).items():
        one = tasks_fit.fit(name, devices=1)
        assert len(ranks[0]) == len(one) == tasks_fit.STEPS
        worst[name] = 0.0
        for r0, r1, single in zip(*ranks, one, strict=True):
            for key, value in r0.items():
                assert torch.equal(value, r1[key]), (name, key)
                worst[name] = max(worst[name], float((value - single[key]).abs().max()))
        assert float((one[-1]["x"] - one[0]["x"]).abs().max()) > 1e-4, name  # x moved
    print("max |2 processes - 1 process|", worst)
    assert all(diff < 1e-10 for diff in worst.values()), worst


def test_batched_data_pairs_each_task_with_its_own_outer_batch():
    data = tasks_fit.TaskData(inner_batch_size=8, shards=2, per_sample=True, lower_level="batched")
    steps = data.paired_steps()
    for t in (0, 3, 5):
        batch = steps[t]
        assert torch.equal(batch["inner"]["index"], batch["outer"]["index"])
        assert torch.equal(batch["outer"]["c"], data.heads.c[batch["outer"]["index"]])


def test_episodic_lower_levels_are_not_checkpointed_and_resume_bitwise(tmp_path):
    spec, _ = tasks_fit.RUNS["amigo_episodic"]
    whole = tasks_fit.Tasks(spec, episodic=True)
    tasks_fit.trainer(1, steps=6).fit(whole, tasks_fit.TaskData(inner_batch_size=8))
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    first = tasks_fit.trainer(1, steps=3, callbacks=[checkpoint], root=str(tmp_path))
    first.fit(tasks_fit.Tasks(spec, episodic=True), tasks_fit.TaskData(inner_batch_size=8))
    path = next(tmp_path.glob("*step=3.ckpt"))
    saved = torch.load(path, weights_only=True)["bilevel"]
    assert saved["inner"] == {} and "v" not in saved["buffers"]  # this step's heads and AmIGO's v live for one step
    resumed = tasks_fit.Tasks(spec, episodic=True)
    tasks_fit.trainer(1, steps=6).fit(resumed, tasks_fit.TaskData(inner_batch_size=8), ckpt_path=str(path))
    assert torch.equal(resumed.state["outer"]["x"], whole.state["outer"]["x"])
    assert resumed.state["t"] == whole.state["t"] == 6


def test_an_algorithm_with_trajectory_memory_rejects_an_inner_init():
    with pytest.raises(ValueError, match="mrbo needs persistent inner variables"):
        tasks_fit.Tasks({"name": "mrbo"}, episodic=True)


def test_full_pass_comes_in_chunks_covering_every_sample_once():
    data = DigitsData(inner_batch_size=16, outer_batch_size=10, per_sample=False, chunk_size=100)
    chunks = data.full_pass("inner")
    ids = torch.cat([batch["index"] for batch, _ in chunks])
    assert torch.equal(ids, torch.arange(data.n_train)) and len(chunks) == -(-data.n_train // 100)
    assert all(len(batch["index"]) <= 100 for batch, _ in chunks)
    assert abs(sum(weight for _, weight in chunks) - 1) < 1e-12
    counts = data.algorithm_data({"n_inner": 1, "n_outer": 1})
    assert counts == {"n_inner": data.n_train, "n_outer": len(data.splits[1])}
