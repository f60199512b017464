"""BIO from the command line (``BIOReconstruction``): ``test`` reproduces the library's
``apg_tv`` + ``bio_restoration`` and logs every iteration's diagnostics; ``fit`` trains the CNN
``D`` and resumes bitwise; user mistakes exit 2 with one line naming the key."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from bilevel_dist.cli import main
from bilevel_dist.recipes.imaging.bio import apg_tv, bio_csmri, bio_restoration, deconv
from bilevel_dist.recipes.imaging.data import ImagingData
from bilevel_dist.recipes.imaging.metrics import scores

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "imaging"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def small(config: str, root: Path, *extra: str) -> list[str]:
    """``config`` at 64×64 (test crops 48×48, 8 patches an image), writing under ``root``."""
    return [
        "--config", str(RECIPES / config), *QUIET,
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root / "logs"),
        "--data.image_size", "64", "--data.patches_per_image", "8", *extra,
    ]  # fmt: skip


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("config", ["bio_deblur.yaml", "bio_mri.yaml"])
def test_cli_test_is_the_library_run_with_every_iteration_logged(config, tmp_path):
    """``bilevel-dist test`` with D = Deconv (nothing to train): the per-image PSNR/SSIM in
    ``test_images.csv`` equal Stage 0 + Algorithm 2 (or 3) called directly to 1e-6 dB; the
    diagnostics CSV has one row per iteration and image, and the logger one step per iteration
    whose ``bio/psnr`` is the images' mean PSNR at that iteration."""
    iters = 25
    args = small(config, tmp_path, "--model.d", "deconv", "--model.iters", str(iters))
    if config == "bio_deblur.yaml":
        args += ["--data.eval_crop", "48"]
    assert main(["test", *args]) == 0
    (out,) = (tmp_path / "logs").glob("*/version_0")
    rows = read(out / "test_images.csv")
    methods = {r["method"] for r in rows}
    assert methods == {"measured", "D(y)", "tv", "bio"}

    data = ImagingData(**_data_args(config))
    data.setup()
    truth, y = data.test["truth"], data.test["y"]
    op = data.operator(truth.shape[-1])
    hp = _model_args(config)
    x_bar, _ = apg_tv(y, op, hp["gamma"], tol=hp["stage0_tol"], max_iter=20000, inner_iters=hp.get("stage0_inner", 200))
    stop = hp.get("tol", 0.0)
    if y.is_complex():
        d = deconv(y, op, hp.get("alpha", 1e-2), toward_observation=False)
        direct = bio_csmri(
            y, op, d, x_bar, hp["beta"], hp["tau"], iters, eta=hp["eta"], rho=hp["rho"], truth=truth, tol=stop
        )
    else:
        d = deconv(y, op, hp.get("alpha", 1e-2))
        direct = bio_restoration(y, op, d, x_bar, hp["beta"], hp["tau"], iters, truth=truth, tol=stop)
    expected = scores(direct.x, truth)
    logged = [float(r["psnr_db"]) for r in rows if r["method"] == "bio"]
    assert torch.allclose(torch.tensor(logged, dtype=torch.float64), expected["psnr"], atol=1e-4), (logged, expected)

    diagnostics = read(out / "bio_diagnostics.csv")
    ran = direct.residual.shape[0]  # the cap, or fewer when every image stopped by the rule
    assert len(diagnostics) == ran * truth.shape[0]
    assert {"residual", "constraint", "objective", "change", "psnr"} <= set(diagnostics[0])
    per_step = {int(r["step"]): float(r["bio/psnr"]) for r in read(out / "metrics.csv") if r.get("bio/psnr")}
    assert sorted(per_step) == list(range(1, ran + 1))
    assert torch.allclose(torch.tensor([per_step[k] for k in range(1, ran + 1)]), direct.psnr.mean(1), atol=1e-4)
    assert (out / "bio_diagnostics.png").stat().st_size > 1000 and (out / "reconstructions.png").stat().st_size > 1000


def _model_args(config: str) -> dict:
    import yaml

    return yaml.safe_load((RECIPES / config).read_text())["model"]["init_args"]


def _data_args(config: str) -> dict:
    import yaml

    args = yaml.safe_load((RECIPES / config).read_text())["data"]["init_args"]
    args.update(image_size=64, patches_per_image=8)
    if config == "bio_deblur.yaml":
        args["eval_crop"] = 48
    return args


def test_fit_trains_the_cnn_and_resumes_bitwise(tmp_path):
    """The CNN ``D``'s training (``d: cnn``): 12 steps straight, and 6 steps then a resume from
    the step-6 checkpoint to 12, end with bitwise-equal weights and Adam moments (that the CNN
    learns to denoise is tests/test_imaging_bio.py's)."""

    def fit(root: Path, steps: int, *extra: str) -> Path:
        args = small(
            "bio_deblur.yaml", root, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "6",
            "--trainer.callbacks.init_args.dirpath", str(root / "ckpt"),
            "--trainer.callbacks.init_args.every_n_train_steps", "6", "--model.iters", "5", *extra,
        )  # fmt: skip
        assert main(["fit", *args]) == 0
        return root / "ckpt"

    straight = torch.load(fit(tmp_path / "a", 12) / "last.ckpt", weights_only=False)
    first = fit(tmp_path / "b", 6)
    resumed = torch.load(fit(tmp_path / "b", 12, "--ckpt_path", str(first / "last.ckpt")) / "last.ckpt",
                         weights_only=False)  # fmt: skip
    assert straight["global_step"] == resumed["global_step"] == 12
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    moments = [s["exp_avg"] for s in straight["optimizer_states"][0]["state"].values()]
    again = [s["exp_avg"] for s in resumed["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, again, strict=True))


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    """Fitting a D with nothing to train, an unknown D, an unknown denoiser setting, β ≤ 0: each
    one line naming the key, exit 2."""
    cases = [
        (["fit", "--model.d", "deconv"], "model.init_args.d"),
        (["test", "--model.d", "wiener"], "model.init_args.d"),
        (["test", "--model.denoiser", '{"widht": 8}'], "model.init_args.denoiser.widht"),
        (["test", "--model.beta", "0"], "model.init_args.beta"),
    ]
    for (command, *extra), key in cases:
        assert main([command, *small("bio_deblur.yaml", tmp_path, *extra)]) == 2, key
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert errors[0].startswith(f"bilevel-dist: error: {key}"), errors[0]
