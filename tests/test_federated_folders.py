"""The federated recipe's local-directory datasets: MNIST and CIFAR-10 through the denoising
recipe's readers, FEMNIST in LEAF's JSON format with its writers as clients; two rounds each."""

import json

import lightning as L
import pytest
import torch
from test_denoising import write_cifar, write_mnist

from bilevel_dist._checks import ConfigError
from bilevel_dist.recipes.federated import Federated, FederatedData


def write_leaf(root, writers=6, side=28):
    generator = torch.Generator().manual_seed(0)
    for split, per in (("train", 9), ("test", 3)):
        (root / split).mkdir(parents=True)
        users = [f"f{i:04d}" for i in range(writers)]
        data = {
            u: {
                "x": torch.rand(per + i, side * side, generator=generator).tolist(),
                "y": [(i + j) % 62 for j in range(per + i)],
            }
            for i, u in enumerate(users)
        }
        half = writers // 2  # LEAF splits writers over several files
        for part, chunk in enumerate((users[:half], users[half:])):
            blob = {
                "users": chunk,
                "num_samples": [len(data[u]["y"]) for u in chunk],
                "user_data": {u: data[u] for u in chunk},
            }
            (root / split / f"all_data_{part}.json").write_text(json.dumps(blob))


def two_rounds(data, root, model="mlp"):
    module = Federated("fedavg", algorithm={"local_lr": 0.05}, model=model, hidden=8)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root)  # fmt: skip
    trainer.fit(module, data)
    results = {}
    for row in trainer.test(module, data, verbose=False):
        results |= {k.split("/")[0]: v for k, v in row.items()}
    return module, results


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_mnist_and_cifar10_from_their_folders(tmp_path, dataset):
    if dataset == "mnist":
        write_mnist(tmp_path, n_train=200, n_test=30)
    else:
        write_cifar(tmp_path, per_batch=40)
    data = FederatedData(dataset, root=str(tmp_path), clients=10, partition="iid", fraction=0.5, local_batch=5)
    train = data.client_data
    assert train.x.shape[1:] == ((1, 28, 28) if dataset == "mnist" else (3, 32, 32))
    assert int(train.sizes.sum() + train.test_sizes.sum()) == (
        180 if dataset == "mnist" else 180
    )  # a tenth is validation
    assert len(data.held_out_set("test")[1]) == (30 if dataset == "mnist" else 40)
    module, results = two_rounds(data, tmp_path)  # the CNN runs in the shipped-config test
    assert module.global_step == 2 and 0.0 <= results["test_accuracy"] <= 1.0
    assert all(torch.isfinite(v).all() for v in module.outer.values())


def test_femnist_writers_are_the_clients(tmp_path):
    write_leaf(tmp_path)
    data = FederatedData("femnist", root=str(tmp_path), fraction=0.5, local_batch=4)
    clients = data.client_data
    assert len(clients) == data.clients == 6
    assert clients.sizes.tolist() == [9 + i for i in range(6)] and clients.test_sizes.tolist() == [
        3 + i for i in range(6)
    ]
    own = clients.gather(torch.tensor([2]), "test")  # writer 2's LEAF test samples are its held-out set
    assert own["y"][0, :5].tolist() == [(2 + j) % 62 for j in range(5)]
    module, results = two_rounds(data, tmp_path)
    assert module.global_step == 2 and {"test_accuracy", "test_client_accuracy", "test_personal_accuracy"} <= set(
        results
    )


def test_missing_or_malformed_folders_name_the_root(tmp_path):
    with pytest.raises(ConfigError) as error:
        FederatedData("mnist")
    assert error.value.key == "root"
    with pytest.raises(ConfigError) as error:
        FederatedData("cifar10", root=str(tmp_path / "absent"))
    assert error.value.key == "root"
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "a.json").write_text("{not json")
    (tmp_path / "test" / "a.json").write_text("{}")
    with pytest.raises(ConfigError) as error:
        FederatedData("femnist", root=str(tmp_path)).client_data  # noqa: B018
    assert error.value.key == "root" and "LEAF" in str(error.value)


def test_every_shipped_config_runs_two_rounds(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from bilevel_dist.cli import main

    recipes = Path(__file__).parents[1] / "recipes" / "federated"
    write_mnist(tmp_path / "mnist", n_train=300, n_test=20)
    write_cifar(tmp_path / "cifar", per_batch=30)
    write_leaf(tmp_path / "femnist")
    roots = {"mnist": tmp_path / "mnist", "cifar10": tmp_path / "cifar", "femnist": tmp_path / "femnist"}
    monkeypatch.chdir(tmp_path)  # the configs' checkpoints and logs land here
    configs = sorted(c for c in recipes.glob("*.yaml") if not c.name.startswith("search"))
    assert len(configs) >= 5
    for config in configs:
        dataset = next((name for name in roots if config.name.startswith(name)), None)
        extra = ["--data.init_args.root", str(roots[dataset])] if dataset else []
        quick = ["--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]
        quick += [
            "--trainer.limit_val_batches",
            "1",
            "--data.init_args.epochs",
            "1",
            "--data.init_args.fraction",
            "0.02",
        ]
        code = main(["fit", "--config", str(config), *quick, *extra])
        assert code in (0, None), (config.name, capsys.readouterr().err[-2000:])
        assert list(tmp_path.glob(f"checkpoints/federated/{config.stem}/*.ckpt")), config.name
