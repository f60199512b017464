"""cluster/: the Ray cluster YAMLs pass Ray's own config checks, install the checkout they mount, the README's ray
commands parse with the installed Ray CLI, and the SLURM script builds the srun line it promises."""

import copy
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.scripts.scripts import cli as ray_cli

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
CHECKOUT = "~/bilevel_dist"
TUNE_ARGS = ["--config", "recipes/data_denoising/digits.yaml", "--search", "recipes/data_denoising/search.yaml"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_three_launchers_are_there():
    assert [path.name for path in CONFIGS] == ["aws.yaml", "gcp.yaml", "local.yaml"]
    assert {load(path)["provider"]["type"] for path in CONFIGS} == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_passes_rays_checks(path):
    raw = load(path)
    jsonschema.validate(raw, SCHEMA)  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` validates: defaults filled, node types resolved
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["max_workers"] == raw["max_workers"]


BREAKS = {
    "unknown top-level key": (lambda config: config.update(max_nodes=3), "Additional properties"),
    "max_workers not an integer": (lambda config: config.update(max_workers="many"), "'many' is not of type"),
    "unknown auth key": (lambda config: config["auth"].update(ssh_password="x"), "Additional properties"),
}


@pytest.mark.parametrize("brk", BREAKS, ids=str)
@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_validator_rejects_a_broken_copy(path, brk):
    breaker, message = BREAKS[brk]
    raw = load(path)
    broken_raw = copy.deepcopy(raw)
    breaker(broken_raw)
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(broken_raw, SCHEMA)
    broken = prepare_config(copy.deepcopy(raw))
    breaker(broken)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_config(broken)


def _pip_editable_targets(commands: list[str]) -> list[tuple[str, str]]:
    """(path, extras) of every `pip install -e TARGET`, with $HOME written as ~."""
    targets = []
    for command in commands:
        words = shlex.split(command)
        if words[:2] == ["pip", "install"] and "-e" in words:
            target = words[words.index("-e") + 1].replace("$HOME", "~")
            path, extras = re.fullmatch(r"([^\[]+)(?:\[(.*)\])?", target).groups()
            targets.append((path.rstrip("/"), extras or ""))
    return targets


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_setup_installs_the_mounted_checkout(path):
    config = load(path)
    assert config["file_mounts"] == {CHECKOUT: "."}  # "." is the repository root `ray up` is run from
    assert config["rsync_filter"] == [".gitignore"]  # no checkpoints or logs shipped to the nodes
    commands = config["setup_commands"]  # setup_commands run on the head and on every worker
    assert _pip_editable_targets(commands) == [(CHECKOUT, "tune,wandb")]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"tune", "wandb"} <= extras.keys()
    assert f'pip install "ray[default]=={ray.__version__}"' in commands  # the cluster runs the Ray the client runs
    assert any(re.match(r"pip install \S*torch", command) for command in commands)
    pip_lines = [i for i, command in enumerate(commands) if command.startswith("pip install")]
    venv_lines = [i for i, command in enumerate(commands) if "venv" in command]
    assert max(venv_lines) < min(pip_lines)  # pip is the Python >= 3.11 venv's by then


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "local"], ids=lambda path: path.stem)
def test_cloud_configs_scale_gpu_workers_behind_a_cpu_head(path):
    config = load(path)
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert head["resources"].get("GPU", 0) == 0
    (worker,) = types.values()
    assert worker["resources"]["GPU"] == 4
    assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
    for accelerator in worker["node_config"].get("guestAccelerators", []):  # gcp: Ray's count must be the VM's
        assert accelerator["acceleratorCount"] == worker["resources"]["GPU"]


def test_local_config_lists_machines_not_node_types():
    config = load(CLUSTER / "local.yaml")
    assert "available_node_types" not in config  # the local provider refuses them
    assert config["provider"]["head_ip"] and len(config["provider"]["worker_ips"]) == config["max_workers"]


def test_tune_launcher_runs_the_cli_from_the_mounted_checkout(monkeypatch):
    import bilevel_dist.cli

    calls = []
    monkeypatch.setattr(bilevel_dist.cli, "main", lambda argv: calls.append(argv) or 3)
    monkeypatch.setattr(os, "chdir", lambda path: calls.append(path))
    monkeypatch.setattr(sys, "argv", ["tune.py", *TUNE_ARGS])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(CLUSTER / "tune.py"), run_name="__main__")
    assert exit_.value.code == 3
    assert calls == [os.path.expanduser(CHECKOUT), ["tune", *TUNE_ARGS]]


def _readme_ray_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(), re.S)
    commands = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()]
    return [words for words in commands if words and words[0] == "ray"]


def _parse(words: list[str]) -> tuple[click.Command, dict]:
    """Parse a `ray ...` command line with the installed Ray CLI, the way `ray` itself would."""
    command, args = ray_cli, words[1:]
    while isinstance(command, click.Group):
        command, args = command.commands[args[0]], args[1:]
    return command, command.make_context(" ".join(words[:2]), list(args)).params


def test_readme_ray_commands_parse_with_the_installed_ray():
    commands = _readme_ray_commands()
    used = {" ".join(words[:3] if words[1] == "job" else words[:2]) for words in commands}
    assert used >= {"ray up", "ray exec", "ray submit", "ray dashboard", "ray job submit", "ray down"}
    for words in commands:
        _, params = _parse(words)
        for value in params.values():
            if isinstance(value, str) and value.startswith("cluster/"):
                assert (REPO / value).is_file(), value


def test_readme_ray_submit_passes_the_tune_arguments_after_the_double_dash():
    (submit,) = [words for words in _readme_ray_commands() if words[1] == "submit"]
    _, params = _parse(submit)
    assert params["cluster_config_file"] == "cluster/aws.yaml" and params["script"] == "cluster/tune.py"
    assert params["tmux"] and list(params["script_args"][:4]) == TUNE_ARGS
    assert "--storage" in params["script_args"]
    assert submit[submit.index("--") + 1 :] == list(params["script_args"])
    # Why the `--`: without it, ray submit keeps any word that is one of its own options (-v here) for itself.
    words = ["ray", "submit", "cluster/aws.yaml", "cluster/tune.py", *TUNE_ARGS, "-v"]
    assert _parse(words)[1]["script_args"] == tuple(TUNE_ARGS)
    assert _parse(words[:4] + ["--"] + words[4:])[1]["script_args"] == (*TUNE_ARGS, "-v")
    (exec_,) = [words for words in _readme_ray_commands() if words[1] == "exec"]
    assert _parse(exec_)[1]["cmd"].startswith(f"cd {CHECKOUT} && bilevel-dist tune ")
    (job,) = [words for words in _readme_ray_commands() if words[1:3] == ["job", "submit"]]
    assert _parse(job)[1]["entrypoint"][:2] == ("bilevel-dist", "tune")


SBATCH = CLUSTER / "slurm.sbatch"
EXTRA = ["--trainer.max_steps", "5"]


def test_sbatch_script_is_valid_bash_with_directives_before_any_command():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = dict(
        re.fullmatch(r"#SBATCH --([\w-]+)=(\S+)", line).groups() for line in lines if line.startswith("#SBATCH")
    )
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))  # sbatch stops there
    assert directives["nodes"] == "2" and directives["time"]
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "4"  # one DDP rank per GPU
    assert "srun bilevel-dist fit" in SBATCH.read_text() and "--trainer.num_nodes" in SBATCH.read_text()


@pytest.mark.parametrize(
    "args, config, extra",
    [
        ([], "recipes/data_denoising/cifar10.yaml", []),
        (["recipes/data_denoising/svhn.yaml", "--trainer.max_steps", "5"], "recipes/data_denoising/svhn.yaml", EXTRA),
    ],
    ids=["default", "override"],
)
def test_sbatch_script_runs_srun_with_the_slurm_geometry(tmp_path, args, config, extra):
    record = tmp_path / "srun.args"
    fake_srun = tmp_path / "srun"
    fake_srun.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    fake_srun.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_CPUS_PER_TASK": "8",
    }
    subprocess.run(["bash", str(SBATCH), *args], check=True, env=env, cwd=REPO)
    expected = ["bilevel-dist", "fit", "--config", config, "--trainer.accelerator", "gpu", "--trainer.strategy", "ddp"]
    expected += ["--trainer.num_nodes", "2", "--trainer.devices", "4", *extra]
    assert record.read_text().splitlines() == expected
