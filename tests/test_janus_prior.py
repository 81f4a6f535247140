"""The Janus check from the prior itself (threedgen.janus_prior): a diffusion-classifier test of a
result's views under the prompt's view tags, on constructed objects (the truth, a two-faced truth, a
shape without a front) and on a tiny Stable Diffusion; the scoring rules on hand-made errors."""

import numpy as np
import pytest
from test_janus_metrics import ExactTruth, _truth

from threedgen.guidance.priors.config import ShapesPriorConfig
from threedgen.janus_prior import janus_prior_metrics, judge_prior_config, score_views, view_azimuths
from threedgen.request import RunRequest


def _cfg(prompt: str, *overrides: str):
    return RunRequest(prompt=prompt, prior="shapes", overrides=overrides).to_config("cpu")


def test_view_azimuths_start_at_the_front_and_wrap():
    assert view_azimuths(4) == [0.0, 90.0, 180.0, -90.0]
    assert view_azimuths(12)[6] == 180.0 and view_azimuths(12)[7] == -150.0


def test_scoring_counts_back_views_called_front_and_a_tie_is_not_a_front():
    az = view_azimuths(12)
    errors = np.ones((12, 3))
    errors[[4, 8], 0] = 0.5  # +120 and -120 look like fronts
    errors[6, 0] = 0.99  # 180: the front tag within the 2 % margin is a tie, not a front
    errors[0] = [0.7, 1.0, 1.0]  # the front called front
    m = score_views(errors, az, margin=0.02)
    assert m["janus_score_prior"] == pytest.approx(2 / 5)  # back views: 120, 150, 180, -150, -120
    assert m["janus_margin_prior"] == pytest.approx(np.mean([1 / 3, 0.0, 0.01 / 1.99, 0.0, 1 / 3]))
    calls = {v["azimuth"]: v["called"] for v in m["janus_views_prior"]}
    assert calls[120.0] == calls[-120.0] == "front" and calls[180.0] == "back" and calls[0.0] == "front"
    counts = np.array(m["janus_confusion_prior"]["counts"])
    assert counts.sum() == 12 and counts[0, 0] == 3  # 0, +30, -30 are fronts, all called front (ties or wins)
    assert counts[1, 0] == 2  # the two sides at 120 degrees called front
    # Everything equal (an object that looks the same from everywhere): nothing is a front.
    assert score_views(np.ones((12, 3)), az, 0.02)["janus_score_prior"] == 0.0


def test_the_unbiased_judge_drops_camera_bias_and_perp_neg_and_run_keeps_them():
    prior = ShapesPriorConfig(camera_kappa=0.0, front_bias=0.95, view_tag_strength=0.5, perp_neg=True)
    judge = judge_prior_config(prior, "unbiased")
    assert (judge.camera_kappa, judge.front_bias, judge.view_tag_strength, judge.perp_neg) == (0.0, None, 1.0, False)
    assert prior.front_bias == 0.95  # a copy: the run's section is untouched
    same = judge_prior_config(prior, "run")
    assert (same.front_bias, same.view_tag_strength, same.perp_neg) == (0.95, 0.5, True)
    assert judge_prior_config(ShapesPriorConfig(), "unbiased").camera_kappa == 0.0


@pytest.mark.parametrize("shape", ["house", "mug"])
def test_the_truth_passes_and_a_two_faced_truth_fails(shape):
    truth = _truth(shape)
    cfg = _cfg(f"a green {shape}", "prior.shapes=[house,mug,cube]")
    good = janus_prior_metrics(ExactTruth(truth), cfg)
    bad = janus_prior_metrics(ExactTruth(truth, two_faced=True), cfg)
    assert good["janus_score_prior"] == 0.0, good["janus_views_prior"]
    # Seen from 150, 180 and -150 degrees the two-faced object shows its front (the views from -30, 0 and 30);
    # from +-120, the front's sides (from -60, 60): 3 of the 5 back views are fronts.
    assert bad["janus_score_prior"] == pytest.approx(0.6), bad["janus_views_prior"]
    assert good["janus_margin_prior"] < -0.2 and bad["janus_margin_prior"] > good["janus_margin_prior"] + 0.2
    counts = np.array(good["janus_confusion_prior"]["counts"])
    assert np.trace(counts) >= 10  # the truth's own views: at least 10 of 12 called by their own tag
    assert good["janus_prior_settings"]["judge"] == "unbiased"


def test_a_shape_without_a_front_is_no_janus():
    m = janus_prior_metrics(ExactTruth(_truth("cube")), _cfg("a green cube", "prior.shapes=[house,cube]"))
    assert m["janus_score_prior"] <= 0.2


def test_a_prior_without_view_tags_gives_no_score_and_says_why():
    # The camera-conditioned prior, judged as it is (janus.judge=run): it has no view-tag conditionings.
    cfg = _cfg("a green house", "prior.shapes=[house]", "janus.judge=run")
    m = janus_prior_metrics(ExactTruth(_truth("house")), cfg)
    assert m["janus_score_prior"] is None and "view-tag" in m["janus_prior_note"]


def test_stable_diffusion_judges_with_its_view_prompts(tiny_sd_dir):
    """Any prior: a tiny random-weight Stable Diffusion loaded from its folder (its ", front view"
    prompts) gives a score in [0, 1] and a full confusion matrix, through the same code."""
    cfg = RunRequest(prompt="a green house", prior=str(tiny_sd_dir), overrides=("janus.views=8", "janus.samples=1",
                                                                                "janus.noise_levels=[0.5]")).to_config("cpu")
    m = janus_prior_metrics(ExactTruth(_truth("house")), cfg)
    assert 0.0 <= m["janus_score_prior"] <= 1.0
    assert np.array(m["janus_confusion_prior"]["counts"]).sum() == 8
    assert len(m["janus_views_prior"]) == 8
