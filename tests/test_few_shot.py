"""The few-shot recipe: episodes, batched meta-gradients against per-task loops, finite
differences and the dense implicit gradient, 2 processes against 1, resume, configs, bad input."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, hessian

from bilevel_dist import tree
from bilevel_dist._checks import ConfigError
from bilevel_dist.recipes.few_shot import FewShot, FewShotData, algorithm_spec, confidence, rotated_digits
from bilevel_dist.recipes.few_shot.tasks import task_generator
from bilevel_dist.solvers import GD, run

RECIPES = Path(__file__).parents[1] / "recipes" / "few_shot"
SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import few_shot_fit  # noqa: E402


def as64(batch):
    if isinstance(batch, dict):
        return {k: as64(v) for k, v in batch.items()}
    return batch.double() if batch.is_floating_point() else batch


def setup(method, dataset, algorithm, tasks=4, **model_args):
    """A module without a trainer (sizes given), and the first training meta-batch in float64."""
    data = FewShotData(dataset, ways=3, shots=2, queries=3, meta_batch=tasks)
    sizes = {
        "ways": data.outputs,
        "meta_batch": tasks,
        "input_shape": data.input_shape,
        "regression": data.regression,
        "train_classes": data.train_classes,
    }
    model = FewShot(method, algorithm=algorithm, width=4, baselines=(), **sizes, **model_args)
    return model, as64(data.train_dataloader().dataset[0])


def meta_direction(model, batch):
    """The direction of one outer step (the outer update divided by its step size), from the
    meta-initialisation, the algorithm's own step."""
    outer = model.initial_outer(model.method)
    algorithm = model.algorithm
    state = algorithm.init(outer, model.inner_init(outer, batch["inner"]))
    state, _ = algorithm.step(state, batch["inner"], batch["outer"])
    lr = algorithm.h["outer_lr"]
    return {k: (outer[k] - v) / lr for k, v in state["outer"].items()}


def one_task(batch, t):
    return {level: {k: v[t : t + 1] for k, v in part.items()} for level, part in batch.items()}


SGD = {"outer_optimizer": "sgd", "outer_lr": 0.5}
CASES = {
    "maml": ("sinusoid", {"inner_steps": 3, "inner_lr": 0.02, **SGD}),
    "fomaml": ("sinusoid", {"inner_steps": 3, "inner_lr": 0.02, **SGD}),
    "imaml": ("sinusoid", {"inner_steps": 3, "inner_lr": 0.02, "linear_iters": 4, **SGD}),
    "anil": ("rotated_digits", {"inner_steps": 3, "inner_lr": 0.3, **SGD}),
    "penalty": ("rotated_digits", {"inner_steps": 2, "inner_lr": 0.3, "outer_lr": 0.5}),
    "maml_conv": ("rotated_digits", {"inner_steps": 2, "inner_lr": 0.3, **SGD}),
    "heads_aid": ("rotated_digits", {"name": "aid", "inner_steps": 2, "inner_lr": 0.3, "linear_iters": 3, **SGD}),
    "heads_stocbio": (
        "rotated_digits",
        {"name": "stocbio", "inner_steps": 2, "inner_lr": 0.3, "linear_iters": 3, **SGD},
    ),
    "heads_soba": ("rotated_digits", {"name": "soba", "inner_lr": 0.3, "outer_lr": 0.5}),  # warmed-up heads
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_meta_gradient_equals_a_loop_over_tasks(case):
    """All tasks in one vmapped lower level against the same algorithm run task by task (batch
    norm statistics per task)."""
    dataset, algorithm = CASES[case]
    model, batch = setup(case.split("_")[0], dataset, algorithm, head_warmup=3 if case == "heads_soba" else 0)
    batched = meta_direction(model, batch)
    looped = tree.zeros_like(batched)
    for t in range(4):
        looped = tree.add(looped, meta_direction(model, one_task(batch, t)))
    scale = max(float(v.abs().max()) for v in batched.values())
    error = max(float((batched[k] - looped[k]).abs().max()) for k in batched)
    assert scale > 1e-3 and error < 1e-10 * max(scale, 1.0), (case, error, scale)


def test_maml_second_order_meta_gradient_matches_central_differences():
    model, batch = setup("maml", "sinusoid", CASES["maml"][1])
    form, outer = model.formulation(), model.initial_outer("maml")
    form.net.body[1] = form.net.body[3] = torch.nn.Tanh()  # smooth: differences never straddle a ReLU kink
    direction = meta_direction(model, batch)

    def meta_loss(theta):
        adapted = run(GD(0.02, 3), model.problem, form.inner_init(theta, batch["inner"]), theta, batch["inner"]).inner
        return float(form.outer_loss(adapted, theta, batch["outer"]))

    generator = torch.Generator().manual_seed(0)
    first_order_model = setup("fomaml", "sinusoid", CASES["fomaml"][1])[0]
    first_order_model.formulation().net.body[1] = first_order_model.formulation().net.body[3] = torch.nn.Tanh()
    first_order = meta_direction(first_order_model, batch)
    for _ in range(3):
        v = {k: torch.randn(x.shape, generator=generator, dtype=x.dtype) for k, x in outer.items()}
        eps = 1e-6
        plus, minus = meta_loss(tree.axpy(eps, v, outer)), meta_loss(tree.axpy(-eps, v, outer))
        numeric = (plus - minus) / (2 * eps)
        analytic = float(tree.dot(direction, v))
        assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
        # first-order MAML drops the second-order term: a different number
        assert abs(float(tree.dot(first_order, v)) - numeric) > 1e-4


def test_imaml_meta_gradient_matches_the_dense_implicit_gradient():
    """``λ (H + λI)⁻¹ ∇L_query`` per task with the Hessian formed densely at the adapted weights."""
    lam = 2.0
    spec = {"inner_steps": 1500, "inner_lr": 0.03, "linear_iters": 100, **SGD}
    model, batch = setup("imaml", "sinusoid", spec, tasks=2, prox=lam)
    form, outer = model.formulation(), model.initial_outer("imaml")
    form.net.body[1] = form.net.body[3] = torch.nn.Tanh()  # smooth: GD reaches the stationary point
    state = model.algorithm.init(outer, form.inner_init(outer, batch["inner"]))
    solution = model.algorithm.solve(state, batch["inner"], batch["outer"])
    keys, shapes = list(outer), [v.shape for v in outer.values()]
    sizes = [v.numel() for v in outer.values()]

    def unflat(flat):
        return dict(zip(keys, [p.reshape(s) for p, s in zip(flat.split(sizes), shapes, strict=True)], strict=True))

    expected = torch.zeros(sum(sizes), dtype=torch.float64)
    for t in range(2):
        w = torch.cat([(outer[k] + solution.inner[k][t]).reshape(-1) for k in keys])
        xs, ys = batch["inner"]["x"][t], batch["inner"]["y"][t]
        xq, yq = batch["outer"]["x"][t], batch["outer"]["y"][t]

        def support_loss(flat, xs=xs, ys=ys):
            return (functional_call(form.net, unflat(flat), (xs,)) - ys).pow(2).mean()

        def query_loss(flat, xq=xq, yq=yq):
            return (functional_call(form.net, unflat(flat), (xq,)) - yq).pow(2).mean() / 2  # meta-batch 2

        h = hessian(support_loss)(w)
        q = torch.func.grad(query_loss)(w)
        expected += lam * torch.linalg.solve(h + lam * torch.eye(len(w), dtype=w.dtype), q)
    inner_grad = model.algorithm.oracles.inner_grad(solution.inner, outer, batch["inner"])
    assert float(tree.norm(inner_grad)) < 1e-6  # the lower levels are solved
    got = torch.cat([solution.grad[k].reshape(-1) for k in keys])
    assert float((got - expected).norm() / expected.norm()) < 1e-8


def test_tasks_depend_only_on_seed_step_and_slot_and_ranks_split_the_meta_batch():
    data = FewShotData("rotated_digits", ways=5, shots=1, queries=3, meta_batch=6)
    a, b = data.draw("train", 7, 3), data.draw("train", 7, 3)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.classes, b.classes)
    assert not torch.equal(data.draw("train", 8, 3).classes, a.classes) or not torch.equal(
        data.draw("train", 8, 3).support_x, a.support_x
    )
    g1, g2 = task_generator(0, "train", 1, 2), task_generator(0, "train", 2, 1)
    assert torch.rand(1, generator=g1) != torch.rand(1, generator=g2)
    whole = data.train_dataloader().dataset[4]
    assert whole["inner"]["index"].tolist() == list(range(6))
    # the support labels are 0..N-1, K per class; queries Q per class
    assert torch.equal(whole["inner"]["y"][0], torch.arange(5))
    assert torch.equal(whole["outer"]["y"][0].bincount(), torch.full((5,), 3))
    # rank r of 2 draws slots 3r..3r+2 of the same meta-batch
    for rank in (0, 1):
        data._rank = lambda rank=rank: (rank, 2)
        part = data.train_dataloader().dataset[4]
        assert part["inner"]["index"].tolist() == [3 * rank, 3 * rank + 1, 3 * rank + 2]
        assert torch.equal(part["inner"]["x"], whole["inner"]["x"][3 * rank : 3 * rank + 3])
        chunks = data.eval_tasks("test")
        tasks = torch.cat([chunks[i]["task"] for i in range(len(chunks))])
        assert torch.equal(tasks.unique(), torch.arange(rank, 600, 2))


def test_rotated_digits_splits_are_disjoint_rotations_of_digits():
    pools = rotated_digits()
    assert [pools[s].classes for s in ("train", "val", "test")] == [24, 8, 8]
    names = [set(pools[s].names) for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    digits = {s: {n.split("_")[0] for n in pools[s].names} for s in pools}
    assert digits["test"] == {"digit8", "digit9"} and digits["val"] == {"digit6", "digit7"}
    train = pools["train"]
    assert torch.equal(train.images[1], torch.rot90(train.images[0], 1, dims=(2, 3)))
    assert train.images.shape[1:] == (170, 1, 8, 8) and float(train.images.max()) == 1.0


def test_confidence_interval_is_the_normal_95_percent_half_width():
    values = torch.tensor([0.2, 0.4, 0.6, 0.8])
    mean, half = confidence(values)
    assert mean == pytest.approx(0.5) and half == pytest.approx(1.96 * values.std().item() / 2)


def test_protonet_prototypes_are_the_class_means_after_its_one_exact_step():
    model, batch = setup("protonet", "rotated_digits", None)
    form, outer = model.formulation(), model.initial_outer("protonet")
    prototypes = model.adapt("protonet", outer, batch["inner"])["centre"]
    phi = form.features(outer, batch["inner"]["x"])  # 3 classes × 2 shots, labels in class order
    means = phi.reshape(4, 3, 2, -1).mean(2)
    assert torch.allclose(prototypes, means, atol=1e-12, rtol=0)
    assert algorithm_spec("protonet", {"inner_steps": 9})["inner_steps"] == 1


def cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bilevel_dist.cli", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


BAD_INPUT = [
    (["--data.init_args.shots", "200"], "data.init_args.shots"),
    (["--data.init_args.ways", "9"], "data.init_args.ways"),
    (["--model.init_args.method", "reptile"], "model.init_args.method"),
    (["--data.init_args.dataset", "omniglot", "--data.init_args.root", "/nonexistent/omniglot"], "data.init_args.root"),
]


def one_error_line(stderr, key):
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith(f"bilevel-dist: error: {key}: "), errors[0]


def test_bad_input_exits_2_with_one_line_naming_the_key(capsys):
    from bilevel_dist.cli import main

    torch.set_default_dtype(torch.float32)
    fit = ["fit", "--config", str(RECIPES / "rotated_digits.yaml"), "--trainer.max_steps", "1"]
    for extra, key in BAD_INPUT[1:]:
        assert main([*fit, *extra]) == 2, key
        one_error_line(capsys.readouterr().err, key)
    extra, key = BAD_INPUT[0]  # and once through the installed command: its exit code and stderr
    result = cli(*fit, *extra)
    assert result.returncode == 2
    one_error_line(result.stderr, key)


@pytest.mark.slow
def test_two_processes_equal_one_with_one_collective_per_meta_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "few_shot_fit.py"), str(tmp_path), "2"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    worst = {}
    for name in few_shot_fit.RUNS:
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in range(2)]
        one, one_collectives = few_shot_fit.fit(name, devices=1)
        assert len(one) == few_shot_fit.STEPS and one_collectives == [0] * few_shot_fit.STEPS
        worst[name] = 0.0
        for r0, r1, single in zip(ranks[0]["steps"], ranks[1]["steps"], one, strict=True):
            for key, value in r0.items():
                assert torch.equal(value, r1[key]), (name, key)
                worst[name] = max(worst[name], float((value - single[key]).abs().max()))
        moved = max(float((one[-1][k] - one[0][k]).abs().max()) for k in one[0])
        assert moved > 1e-6, name
        # the tasks' inner loops make none: the meta-gradient is one all-reduce; Penalty adds the
        # scalar of its γ/ε schedule test
        expected = 2 if name.startswith("penalty") else 1
        assert ranks[0]["collectives"] == ranks[1]["collectives"] == [expected] * few_shot_fit.STEPS, name
    print("max |2 processes - 1 process|", worst)
    assert all(diff < 1e-10 for diff in worst.values()), worst


RESUME = """
seed_everything: 0
model:
  class_path: bilevel_dist.recipes.few_shot.FewShot
  init_args:
    method: maml
    width: 4
    baselines: []
    algorithm: {inner_steps: 2, inner_lr: 0.3, outer_lr: 0.01}
data:
  class_path: bilevel_dist.recipes.few_shot.FewShotData
  init_args: {dataset: rotated_digits, ways: 3, shots: 1, queries: 2, meta_batch: 4, val_tasks: 6, test_tasks: 6}
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
def test_kill9_then_resume_gives_bitwise_the_same_meta_parameters(tmp_path):
    (tmp_path / "fit.yaml").write_text(RESUME % "")
    kill = "\n    - class_path: kill_at.KillAt\n      init_args: {step: 7}"
    (tmp_path / "kill.yaml").write_text(RESUME % kill)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    assert cli("fit", "--config", str(tmp_path / "fit.yaml"), cwd=whole).returncode == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    killed = cli("fit", "--config", str(tmp_path / "kill.yaml"), cwd=broken, env=env)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(broken / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    resumed = cli("fit", "--config", str(tmp_path / "fit.yaml"), "--ckpt_path", "last", cwd=broken)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(broken / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["few_shot"]["history"] == b["few_shot"]["history"]  # validation at the same steps, same numbers
    moved = a["state_dict"]["outer_vars.head|weight"]
    assert not torch.equal(
        moved,
        torch.load(whole / "checkpoints/epoch=0-step=4.ckpt", weights_only=True)["state_dict"][
            "outer_vars.head|weight"
        ],
    )


def test_unknown_method_and_backbone_name_the_key():
    with pytest.raises(ConfigError) as error:
        FewShot("reptile")
    assert error.value.key == "method"
    with pytest.raises(ConfigError) as error:
        FewShot("maml", backbone="vgg")
    assert error.value.key == "backbone"


def shipped_configs(tmp_path):
    """Every shipped config with overrides that make it 2 tiny steps on tiny files in its format."""
    from test_few_shot_folders import make_omniglot, make_pickles

    make_omniglot(tmp_path / "omniglot")
    make_pickles(tmp_path / "mini", classes=(5, 5, 5), side=16)
    small = ["--data.init_args.ways", "3", "--data.init_args.queries", "2", "--data.init_args.num_workers", "0"]
    files = {
        "omniglot": ["--data.init_args.root", str(tmp_path / "omniglot"), "--data.init_args.omniglot_split", "[4, 2]"],
        "mini_imagenet": ["--data.init_args.root", str(tmp_path / "mini"), "--data.init_args.image_size", "16"],
    }
    configs = {}
    for path in sorted(RECIPES.glob("*.yaml")):
        extra = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.logger", "false"]
        extra += ["--data.init_args.val_tasks", "3", "--data.init_args.test_tasks", "3"]
        extra += ["--data.init_args.meta_batch", "2"]
        extra += ["--model.init_args.baselines", "[]", "--model.init_args.width", "4"]
        for prefix, given in files.items():
            if path.stem.startswith(prefix):
                extra += given + small
        configs[path.name] = extra
    return configs


def test_every_shipped_config_runs_two_steps_on_tiny_files_in_its_format(tmp_path, monkeypatch):
    from bilevel_dist.cli import main

    torch.set_default_dtype(torch.float32)  # as `bilevel-dist` runs them (the conftest's float64 is for tests)
    configs = shipped_configs(tmp_path)
    assert set(configs) >= {"sinusoid.yaml", "rotated_digits.yaml", "omniglot.yaml", "mini_imagenet.yaml"}
    for name, extra in configs.items():
        cwd = tmp_path / name
        cwd.mkdir()
        monkeypatch.chdir(cwd)  # the configs' checkpoint folders are relative
        assert main(["fit", "--config", str(RECIPES / name), *extra]) == 0, name
        saved = torch.load(next(cwd.glob("checkpoints/**/last.ckpt")), weights_only=True)
        assert saved["global_step"] == 2 and saved["few_shot"]["history"], name  # validated at step 2


def test_test_command_reports_the_method_and_each_baseline_with_confidence_intervals(tmp_path):
    extra = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.init_args.val_tasks", "4"]
    extra += ["--data.init_args.test_tasks", "10", "--data.init_args.meta_batch", "4", "--model.init_args.width", "4"]
    extra += ["--model.init_args.head_steps", "5", "--trainer.logger", "false"]
    config = str(RECIPES / "rotated_digits.yaml")
    assert cli("fit", "--config", config, *extra, cwd=tmp_path).returncode == 0
    ckpt = str(tmp_path / "checkpoints/few_shot/rotated_digits/last.ckpt")
    tested = cli("test", "--config", config, *extra, "--ckpt_path", ckpt, cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-2000:]
    out = tested.stdout + tested.stderr
    assert "few-shot meta-test, 10 tasks: accuracy" in out
    for name in ("maml", "protonet", "pretrain"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        mean, half = (float(v) for v in line.split()[1::2])
        assert 0 <= mean <= 1 and 0 < half < 1, line
    saved = torch.load(ckpt, weights_only=True)["few_shot"]
    validated = cli("validate", "--config", config, *extra, "--ckpt_path", ckpt, cwd=tmp_path)
    assert validated.returncode == 0 and "val_accuracy" in validated.stdout, validated.stderr[-2000:]
    # the same number as the last validation in fit
    value = float(next(line for line in validated.stdout.splitlines() if "val_accuracy" in line).split()[-1])
    assert value == pytest.approx(saved["history"]["maml"][-1][1], abs=1e-6)
    assert set(saved["baselines"]) == {"protonet", "pretrain"}
    assert [s for s, _ in saved["history"]["protonet"]] == [s for s, _ in saved["history"]["maml"]] == [2, 4]
    assert (tmp_path / "few_shot_curves.png").exists() or list(tmp_path.glob("**/few_shot_curves.png"))
