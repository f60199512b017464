"""The federated recipe: exact aggregation, batched = looped clients, partitions, faults and
robust aggregation, 2 processes = 1, kill -9 and resume, bad input."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bilevel_dist import algorithms
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.recipes.federated import Federated, FederatedData, partition
from bilevel_dist.recipes.federated.data import digits, local_schedule
from bilevel_dist.recipes.federated.module import privacy_spent

RECIPES = Path(__file__).parents[1] / "recipes" / "federated"
SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import federated_fit  # noqa: E402


def as64(batch):
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_two_clients_of_unequal_size_average_exactly_as_by_hand(float64):
    # client c's loss: the mean over its samples of ½‖θ − x‖²; one full-batch step of η = 1/2
    # takes θ_c = w − ½(w − x̄_c), so Δ_c = ½(w − x̄_c) and the server averages Δ by data size
    def inner_loss(inner, outer, batch):
        diff = inner["w"][:, None, :] - batch["x"]
        return (batch["weight"][..., None] * 0.5 * diff**2).sum()

    problem = BilevelProblem(inner_loss, lambda i, o, b: torch.zeros(()), batched=True)
    fedavg = algorithms.get("fedavg", problem=problem, local_lr=0.5)
    x = torch.zeros(2, 7, 2)
    x[0, :3] = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])  # mean (3, 2)
    x[1] = torch.tensor([[8.0, 8.0]] * 6 + [[1.0, 1.0]])  # mean (7, 7)
    sizes = torch.tensor([3, 7])
    weight = torch.zeros(1, 2, 7)
    weight[0, 0, :3], weight[0, 1] = 1 / 3, 1 / 7
    batch = {"x": x, "weight": weight, "size": sizes, "dropped": torch.tensor([False, False]),
             "sampled": torch.tensor([2, 2]), "index": torch.tensor([4, 9])}  # fmt: skip
    w = {"w": torch.tensor([1.0, -1.0])}
    state = fedavg.restart(fedavg.init(w, {}), {})
    state, _ = fedavg.step(state, batch, batch)
    by_hand = (
        torch.tensor([1.0, -1.0])
        - (3 * 0.5 * torch.tensor([1.0 - 3, -1 - 2]) + 7 * 0.5 * torch.tensor([1.0 - 7, -1 - 7])) / 10
    )
    assert torch.equal(state["outer"]["w"], by_hand), (state["outer"]["w"], by_hand)
    uniform = algorithms.get("fedavg", problem=problem, local_lr=0.5, weighting="uniform")
    state, _ = uniform.step(uniform.restart(uniform.init(w, {}), {}), batch, batch)
    by_hand = (
        torch.tensor([1.0, -1.0]) - (0.5 * torch.tensor([1.0 - 3, -1 - 2]) + 0.5 * torch.tensor([1.0 - 7, -1 - 7])) / 2
    )
    assert torch.equal(state["outer"]["w"], by_hand)


def _module(method="fedavg", **algorithm):
    data = FederatedData(clients=16, partition="dirichlet", fraction=1.0, epochs=2, local_batch=5)
    model = Federated(method, algorithm=algorithm, hidden=16, input_shape=data.input_shape, classes=data.classes)
    model._build()
    return model, data


def test_fedsgd_is_one_step_of_centralised_gradient_descent(float64):
    data = FederatedData(clients=16, partition="dirichlet", fraction=1.0, epochs=1, local_batch=0)
    model = Federated("fedsgd", algorithm={"local_lr": 0.5}, hidden=16, input_shape=data.input_shape, classes=10)
    model._build()
    state = model.state
    w0 = {k: v.clone() for k, v in state["outer"].items()}
    batch = as64(data.round(0)["inner"])
    assert sorted(batch["size"].unique().tolist()) != [int(batch["size"][0])]  # unequal clients
    state = model.algorithm.restart(state, model.inner_init(state["outer"], batch))
    state, _ = model.algorithm.step(state, batch, batch)
    clients = data.client_data
    ids = torch.cat([clients.table[i, : clients.sizes[i]] for i in batch["index"]])
    w = {k: v.clone().requires_grad_() for k, v in w0.items()}
    loss = F.cross_entropy(functional_call(model.net, w, (clients.x[ids].double(),)), clients.y[ids])
    grads = torch.autograd.grad(loss, list(w.values()))
    for (key, value), grad in zip(w0.items(), grads, strict=True):
        assert torch.allclose(state["outer"][key], value - 0.5 * grad, rtol=0, atol=1e-12), key


@pytest.mark.parametrize("method", ["fedavg", "fedprox"])
def test_batched_local_training_equals_a_loop_over_clients(float64, method):
    model, data = _module(method, local_lr=0.3, prox=0.1 if method == "fedprox" else 0.0, client_chunk=5)
    w = model.state["outer"]
    batch = as64(data.round(3)["inner"])
    assert len(batch["size"].unique()) > 8  # unequal sizes: padding and masked steps
    together = model.algorithm.local_training(w, batch)
    worst = 0.0
    for c in range(16):  # each client alone, unpadded, with only its own steps
        n = int(batch["size"][c])
        steps = int((batch["weight"][:, c].sum(1) > 0).sum())
        one = {k: v[c : c + 1] for k, v in batch.items() if k != "weight"}
        one |= {"x": one["x"][:, :n], "y": one["y"][:, :n], "weight": batch["weight"][:steps, c : c + 1, :n]}
        alone = model.algorithm.local_training(w, one)
        worst = max(worst, max(float((alone[k][0] - together[k][c]).abs().max()) for k in alone))
    moved = max(float((together[k] - w[k]).abs().max()) for k in w)
    assert moved > 1e-3 and worst < 1e-10, (moved, worst)


def test_partitions_are_deterministic_and_shaped_as_named():
    y = digits()["train"][1]
    torch.set_default_dtype(torch.float64)  # draws do not depend on the default dtype
    try:
        as_float64 = partition(y, 100, "dirichlet", alpha=0.3, seed=3)
        rounds64 = FederatedData(clients=20, dropout=0.5).round(2)
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(
        torch.equal(a, b) for a, b in zip(as_float64, partition(y, 100, "dirichlet", alpha=0.3, seed=3), strict=True)
    )
    rounds32 = FederatedData(clients=20, dropout=0.5).round(2)
    assert all(torch.equal(v, rounds32["inner"][k]) for k, v in rounds64["inner"].items())
    for scheme in ("iid", "dirichlet", "shards"):
        parts = partition(y, 100, scheme, alpha=0.3, seed=3)
        again = partition(y, 100, scheme, alpha=0.3, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
        assert min(len(p) for p in parts) >= 1
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(y)))  # each sample once
    labels = {
        s: torch.tensor([len(y[p].unique()) for p in partition(y, 100, s, alpha=0.3)])
        for s in ("iid", "dirichlet", "shards")
    }
    # two shards of ~7 samples each: 2 labels, up to 4 where a shard spans a label boundary
    assert labels["iid"].float().mean() > 6 and labels["shards"].max() <= 4 and labels["shards"].float().mean() < 2.5
    assert labels["dirichlet"].float().mean() < labels["iid"].float().mean() - 2
    sizes = torch.tensor([len(p) for p in partition(y, 100, "dirichlet", alpha=0.3)])
    assert sizes.max() > 3 * sizes.min()
    many = partition(y, 10_000, "dirichlet", alpha=0.3, samples_per_client=8)
    assert len(many) == 10_000 and all(len(p) == 8 for p in many[:100])


def test_local_schedule_covers_each_sample_once_per_epoch_in_minibatches():
    sizes = torch.tensor([1, 5, 12, 7])
    weight = local_schedule(sizes, epochs=3, batch=5, generator=torch.Generator().manual_seed(0))
    assert weight.shape == (3 * 3, 4, 12)  # the largest client: ⌈12/5⌉ = 3 steps an epoch
    for c, n in enumerate(sizes.tolist()):
        active = weight[:, c].sum(1) > 0
        assert int(active.sum()) == 3 * -(-n // 5)  # E·⌈n/B⌉ steps
        assert torch.allclose(weight[active, c].sum(1), torch.ones(int(active.sum()), dtype=weight.dtype))
        assert torch.equal((weight[:, c, :n] > 0).sum(0), torch.full((n,), 3))  # each sample once an epoch
        assert not weight[:, c, n:].any()
    # a rank's share alone (what a rank builds) is its rows of the whole round's schedule
    for only in (torch.tensor([0, 2]), torch.tensor([1, 3])):
        part = local_schedule(sizes, epochs=3, batch=5, generator=torch.Generator().manual_seed(0), only=only)
        assert torch.equal(part, weight[:, only])


def _fit(root, aggregator, faults=None, dropout=0.0, rounds=60):
    L.seed_everything(0, verbose=False)
    data = FederatedData(
        clients=100, partition="iid", fraction=0.1, epochs=5, local_batch=10, dropout=dropout, faults=faults
    )
    model = Federated("fedavg", algorithm={"local_lr": 0.1, "aggregator": aggregator})
    trainer = L.Trainer(max_steps=rounds, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root)  # fmt: skip
    trainer.fit(model, data)
    trainer.test(model, data, verbose=False)
    return model.results["test_accuracy"], model


@pytest.mark.slow
def test_faulty_rounds_complete_and_robust_aggregation_stays_within_two_points(tmp_path):
    # every round: 20% of the sampled clients drop out, one sends NaN, one sends its update ×100
    faults = {"nan": 1, "scaled": 1, "scale": 100.0}
    clean, _ = _fit(tmp_path, "mean")
    results = {}
    for aggregator in ("mean", "median", "trimmed_mean"):
        accuracy, model = _fit(tmp_path, aggregator, faults, dropout=0.2)
        assert model.global_step == 60 and all(torch.isfinite(v).all() for v in model.outer.values())
        results[aggregator] = accuracy
    print("clean", clean, "faulty", results)
    assert clean > 0.9
    assert abs(results["median"] - clean) <= 0.02 and abs(results["trimmed_mean"] - clean) <= 0.02
    assert results["mean"] < clean - 0.2


def test_a_round_leaves_out_dropped_and_non_finite_clients_by_id(float64, caplog):
    model, _ = _module()
    data = FederatedData(clients=20, fraction=0.5, dropout=0.3, faults={"nan": 1}, seed=1)
    batch = as64(data.round(2)["inner"])  # 4 of its 10 clients drop out
    state = model.algorithm.restart(model.state, model.inner_init(model.state["outer"], batch))
    state, metrics = model.algorithm.step(state, batch, batch)
    left_out = sorted(batch["index"][batch["dropped"] | (batch["fault"] == 1)].tolist())
    assert sorted(model.algorithm.excluded) == left_out and len(left_out) >= 2
    assert model.algorithm.non_finite == batch["index"][batch["fault"] == 1].tolist()
    assert metrics.floats()["clients_used"] == 10 - len(left_out)
    assert all(torch.isfinite(v).all() for v in state["outer"].values())


def test_a_client_whose_local_solve_fails_sits_the_round_out(float64):
    model, data = _module(client_chunk=4)
    batch = as64(data.round(0)["inner"])
    direction = model.algorithm.local_direction

    def failing(theta, w, part):
        if 5 in part["index"].tolist():
            raise RuntimeError("out of memory (simulated)")
        return direction(theta, w, part)

    model.algorithm.local_direction = failing
    state = model.algorithm.restart(model.state, model.inner_init(model.state["outer"], batch))
    state, metrics = model.algorithm.step(state, batch, batch)
    chunk = next(part["index"].tolist() for _, part in model.algorithm.chunks(batch) if 5 in part["index"].tolist())
    assert model.algorithm.failed == chunk and metrics.floats()["clients_used"] == 16 - len(chunk)
    assert all(torch.isfinite(v).all() for v in state["outer"].values())


def test_privacy_accounting_comes_from_the_rdp_accountant():
    spent = [privacy_spent(0.1, sigma, rounds, 1e-5) for sigma, rounds in ((1.0, 100), (1.0, 200), (2.0, 200))]
    assert spent[0] < spent[1] and spent[2] < spent[1]
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(2.0))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 200))
    assert abs(spent[2] - accountant.get_epsilon(1e-5)) < 0.05 * spent[2]  # the orders differ slightly


@pytest.mark.slow
def test_two_processes_equal_one_with_no_collective_in_local_training(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "federated_fit.py"), str(tmp_path), "2"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    worst = {}
    for name in federated_fit.RUNS:
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in range(2)]
        one, _, _, scores = federated_fit.fit(name, devices=1)
        for rank in ranks:  # validation and test (global, per client, personalised) as on 1 process
            assert rank["scores"] == pytest.approx(scores, rel=1e-12, abs=0), (name, rank["scores"], scores)
        assert len(one) == federated_fit.ROUNDS
        worst[name] = 0.0
        for r0, r1, single in zip(ranks[0]["rounds"], ranks[1]["rounds"], one, strict=True):
            for key, value in r0.items():
                assert torch.equal(value, r1[key]), (name, key)
                worst[name] = max(worst[name], float((value - single[key]).abs().max()))
        assert max(float((one[-1][k] - one[0][k]).abs().max()) for k in one[0]) > 1e-4, name
        for rank in ranks:  # local training: none; a round: the one aggregation
            assert all(n == 0 for n in rank["local"]) and len(rank["local"]) > federated_fit.ROUNDS, (
                name
            )  # several chunks a round
            assert rank["whole"] == [1] * federated_fit.ROUNDS, name
    print("max |2 processes - 1 process|", worst)
    assert all(diff < 1e-10 for diff in worst.values()), worst


def cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bilevel_dist.cli", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


RESUME = """
seed_everything: 0
model:
  class_path: bilevel_dist.recipes.federated.Federated
  init_args:
    method: fedadam
    hidden: 8
    algorithm: {local_lr: 0.1, aggregator: trimmed_mean}
data:
  class_path: bilevel_dist.recipes.federated.FederatedData
  init_args: {clients: 30, partition: dirichlet, fraction: 0.2, epochs: 2, local_batch: 5, dropout: 0.2}
trainer:
  max_steps: 12
  precision: 64-true
  val_check_interval: 6
  check_val_every_n_epoch: null
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:%s
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: checkpoints, save_last: true, every_n_train_steps: 4, save_top_k: -1}
"""


@pytest.mark.slow
def test_kill9_between_rounds_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    (tmp_path / "fit.yaml").write_text(RESUME % "")
    (tmp_path / "kill.yaml").write_text(RESUME % "\n    - class_path: kill_at.KillAt\n      init_args: {step: 7}")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    assert cli("fit", "--config", str(tmp_path / "fit.yaml"), cwd=whole).returncode == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    assert cli("fit", "--config", str(tmp_path / "kill.yaml"), cwd=broken, env=env).returncode == -signal.SIGKILL
    assert torch.load(broken / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    resumed = cli("fit", "--config", str(tmp_path / "fit.yaml"), "--ckpt_path", "last", cwd=broken)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(broken / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key in ("server_m", "server_v"):  # the server optimiser's state is in the checkpoint too
        for name, value in a["bilevel"]["buffers"][key].items():
            assert torch.equal(value, b["bilevel"]["buffers"][key][name]), (key, name)
    early = torch.load(whole / "checkpoints/epoch=0-step=4.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(v, early[k]) for k, v in a["state_dict"].items())


BAD_INPUT = [
    (["--data.init_args.fraction", "1.5"], "data.init_args.fraction"),
    (["--data.init_args.fraction", "0"], "data.init_args.fraction"),
    (["--data.init_args.alpha", "0"], "data.init_args.alpha"),
    (
        [
            "--data.init_args.partition",
            "shards",
            "--data.init_args.clients",
            "900",
            "--data.init_args.shards_per_client",
            "2",
        ],
        "data.init_args.shards_per_client",
    ),  # fmt: skip
    (["--model.init_args.algorithm", '{"aggregator": "krum"}'], "model.init_args.algorithm.aggregator"),
    (["--model.init_args.algorithm", '{"noise_multiplier": -1}'], "model.init_args.algorithm.noise_multiplier"),
]


def test_bad_input_exits_2_with_one_line_naming_the_key(capsys):
    from bilevel_dist.cli import main

    fit = ["fit", "--config", str(RECIPES / "digits_fedavg.yaml"), "--trainer.max_steps", "1"]
    for extra, key in BAD_INPUT[1:]:
        assert main([*fit, *extra]) == 2, key
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert errors[0].startswith(f"bilevel-dist: error: {key}: "), errors[0]
    extra, key = BAD_INPUT[0]  # and once through the installed command
    result = cli(*fit, *extra)
    assert result.returncode == 2 and f"error: {key}: " in result.stderr and "Traceback" not in result.stderr
