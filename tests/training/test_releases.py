"""The bundled flatness-aware releases: each regularizer was live at its release lambda."""

import dataclasses
import json
import pathlib
import statistics

import pytest

import flatopt
from training.meta import MetaTrainer, Recipe

REGULARIZED = ["dm-cl-hessian-trace", "dm-cl-hessian-ev", "dm-cl-jacobian-trace", "dm-cl-entropy"]
LOGS = pathlib.Path(__file__).resolve().parents[2] / "training" / "logs"
# A regularizer whose gradient is under a tenth of the loss's barely trains anything.
MATERIAL_SHARE = 0.1


def test_the_five_releases_are_bundled():
    assert {"dm-cl", *REGULARIZED} <= set(flatopt.list_pretrained())


@pytest.mark.parametrize("name", REGULARIZED)
def test_release_lambda_moves_the_meta_gradient(name, mnist, tmp_path):
    _, config = flatopt.load_release(name)
    recipe = Recipe(**config["provenance"]["recipe"])
    assert recipe.regularizer == name.removeprefix("dm-cl-")
    # One unroll of the release's own recipe, from the release's weights.
    short = dataclasses.replace(
        recipe,
        init_weights=name,
        output_scale=config["update_rule"]["output_scale"],
        curriculum=[],
        stage_imitation_probabilities=[],
        imitation_probability=0.0,
        meta_epochs=1,
        meta_unrolls=1,
    )
    record = MetaTrainer(short, mnist, tmp_path, progress=False).train_epoch(0)
    assert record["regularizer_grad_ratio"] > MATERIAL_SHARE, record


@pytest.mark.parametrize("name", REGULARIZED)
def test_release_log_records_a_material_gradient_share(name):
    records = [json.loads(line) for line in (LOGS / f"{name}.jsonl").read_text().splitlines()]
    ratios = [r["regularizer_grad_ratio"] for r in records if "regularizer_grad_ratio" in r]
    assert len(ratios) >= 5
    assert statistics.fmean(ratios) > MATERIAL_SHARE
