"""Release evaluation against tuned Adam, and the model cards and README table made from it."""

import dataclasses
import json
import shutil

import pytest

import flatopt
from training.evaluation import (
    TABLE_END,
    TABLE_START,
    card_section,
    differences_from_paper,
    evaluate_releases,
    flatness_verdicts,
    render,
)
from training.meta import Recipe

SMALL = dict(steps=(10, 20), seeds=2, adam_lrs=(1e-3, 1e-2), probes=2, progress=None)


@pytest.fixture(scope="module")
def results(mnist, tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluation") / "results.json"
    evaluate_releases(["adam"], mnist, path, **SMALL)
    # A second call adds an optimizer to the same file instead of starting over.
    return path, evaluate_releases(["dm"], mnist, path, **SMALL)


def test_results_hold_every_step_seed_and_metric(results):
    _, data = results
    assert set(data["optimizers"]) == {"adam", "dm"}
    for name in ("adam", "dm"):
        for optimizee in ("mlp-relu", "conv-mnist"):
            result = data["optimizers"][name][optimizee]
            assert [r["seed"] for r in result["runs"]] == [0, 1]
            for step in ("10", "20"):
                summary = result["summary"][step]
                assert summary["runs"] == 2
                assert 0.0 < summary["test_accuracy"][0] <= 1.0
                assert summary["train_loss"][0] > 0.0
                assert summary["hessian_trace"][0] > 0.0
                values = [r["steps"][step]["test_accuracy"] for r in result["runs"]]
                assert summary["test_accuracy"][0] == pytest.approx(sum(values) / 2)


def test_adam_learning_rate_is_the_best_on_validation(results):
    _, data = results
    for tuned in data["adam"].values():
        assert tuned["lr"] == float(max(tuned["grid"], key=tuned["grid"].get))
        assert len(tuned["grid"]) == len(data["settings"]["adam_grid"])


def test_other_settings_are_not_mixed_into_a_results_file(results, mnist):
    path, _ = results
    with pytest.raises(ValueError, match="other settings"):
        evaluate_releases(["dm"], mnist, path, **{**SMALL, "steps": (10, 30)})


def test_render_rewrites_the_readme_table_and_the_model_card(results, tmp_path):
    _, data = results
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{TABLE_START}\nstale\n{TABLE_END}\n\n## Next\nkept\n")
    shutil.copytree(flatopt.weights.bundled_release("dm"), tmp_path / "pretrained" / "dm")

    for _ in range(2):  # rendering twice gives the same documents
        render(data, readme, tmp_path / "pretrained", tmp_path / "logs")
        text = readme.read_text()
        card = (tmp_path / "pretrained" / "dm" / "README.md").read_text()
        assert "stale" not in text and text.endswith("## Next\nkept\n")
        assert text.count("| dm | conv-mnist |") == 1
        assert text.count("| Adam (lr ") == 2
        assert card.count("## Held-out comparison") == 1
        assert card.index("## Held-out comparison") < card.index("## How it was made")

    config = json.loads((tmp_path / "pretrained" / "dm" / "config.json").read_text())
    accuracy = data["optimizers"]["dm"]["mlp-relu"]["summary"]["20"]["test_accuracy"][0]
    assert config["held_out_results"]["summary"]["dm"]["mlp-relu"]["20"]["test_accuracy"][0] == (
        accuracy
    )
    assert f"{100 * accuracy:.2f}%" in card
    flatopt.load_release(tmp_path / "pretrained" / "dm")  # still a valid release


def test_render_refuses_a_readme_without_markers(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n")
    with pytest.raises(ValueError, match="markers"):
        render(results[1], readme, tmp_path, tmp_path)


def _fake_results(accuracies):
    """Results with given (mean, std) test accuracies per optimizer at steps 1000 and 3000."""

    def entry(pair, trace):
        stats = {"test_accuracy": pair, "train_loss": [0.1, 0.0], "hessian_trace": [trace, 0.0]}
        return {"summary": {"1000": stats, "3000": stats}}

    return {
        "settings": {"steps": [1000, 3000]},
        "optimizers": {
            name: {"mlp-relu": entry(pair, trace)} for name, (pair, trace) in accuracies.items()
        },
    }


def test_flatness_verdicts_count_only_differences_beyond_the_spread():
    results = _fake_results(
        {
            "adam": ([0.95, 0.002], 10.0),
            "dm-cl": ([0.93, 0.005], 20.0),
            "better": ([0.94, 0.002], 10.0),
            "noisy": ([0.94, 0.02], 20.0),
            "worse": ([0.90, 0.001], 40.0),
            "ahead": ([0.96, 0.001], 10.0),
        }
    )

    text = flatness_verdicts(results)

    lines = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("- `")}
    assert "better by 1.00 points" in lines["better"]
    assert "Hessian trace 0.5x" in lines["better"]
    assert "no clear difference (+1.00 points)" in lines["noisy"]
    assert "worse by 3.00 points" in lines["worse"]
    assert "5.00 points below tuned Adam @1000" in lines["worse"]
    assert lines["dm-cl"] == "- `dm-cl`: mlp-relu: 2.00 points below tuned Adam @1000."
    assert "1.00 points above tuned Adam @1000" in lines["ahead"]


def test_scale_releases_are_judged_against_the_unregularized_scale_release():
    results = _fake_results(
        {
            "adam": ([0.95, 0.002], 10.0),
            "dm-cl": ([0.90, 0.002], 20.0),
            "scale": ([0.94, 0.002], 10.0),
            "scale-hessian-trace": ([0.93, 0.002], 5.0),
        }
    )

    text = flatness_verdicts(results)

    lines = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("- `")}
    regularized = lines["scale-hessian-trace"]
    assert "(against `scale`)" in regularized
    assert "worse by 1.00 points" in regularized  # not "better by 3.00", as against dm-cl
    assert "Hessian trace 0.5x" in regularized
    assert lines["scale"] == "- `scale`: mlp-relu: 1.00 points below tuned Adam @1000."

    results["settings"].update(
        seeds=3, adam_grid=["0.01"], hessian_trace="Hutchinson", train_loss="10 images"
    )
    results.update(adam={"mlp-relu": {"lr": 0.01}}, machine="a test machine")
    recipe = dataclasses.asdict(Recipe(architecture="scale", optimizee="scale-cnn"))
    card = card_section(
        results,
        "scale-hessian-trace",
        ["scale-hessian-trace", "scale", "dm-cl", "adam"],
        None,
        recipe,
    )
    assert (
        "with this release, `scale` (its recipe without the flatness regularizer), `dm-cl` and Adam"
        in card
    )
    card = card_section(results, "scale", ["scale", "dm-cl", "adam"], None, recipe)
    assert "with this release (no flatness regularizer), `dm-cl` and Adam" in card


def test_a_scale_recipe_names_its_departures_from_the_paper():
    recipe = Recipe(
        architecture="scale",
        optimizee="scale-cnn",
        meta_optimizer="rmsprop",
        meta_objective="log-loss-ratio",
        regularizer="hessian-trace",
        reg_lambda=5e-5,
        initial_log_lr=-5.9078,
    )
    shares = {"mean": 0.02, "min": 0.01, "max": 0.04, "epochs": 3}

    text = differences_from_paper(dataclasses.asdict(recipe), shares)

    assert "lambda = 5e-05, the paper's (its gradient averaged 0.02 times" in text
    assert "chosen by a search" not in text
    assert "step size starts at 0.001 (initial log step size -5.9078" in text
    assert "around 3.7e-05" in text
    assert "meta-trains on an ensemble of small problems" in text

    searched = dataclasses.asdict(dataclasses.replace(recipe, reg_lambda=1e-3))
    assert "instead of the paper's 5e-05, chosen by a search" in differences_from_paper(
        searched, shares
    )
    default_start = dataclasses.asdict(
        dataclasses.replace(recipe, initial_log_lr=flatopt.scale_rule.INITIAL_LOG_LR)
    )
    assert "step size starts at" not in differences_from_paper(default_start, shares)
