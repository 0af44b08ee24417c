"""Routing and calibration metrics on small worked examples."""

import numpy as np
import pytest

from tierpick.classifier.routing import platt as apply_platt
from tierpick.classifier.routing import threshold_choice
from tierpick.training import metrics
from tierpick.training.calibrate import fit_platt


def test_ece_and_reliability() -> None:
    p = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0.0, 0.0, 1.0, 1.0])
    assert metrics.ece(y, p) == pytest.approx(0.1)
    rel = metrics.reliability(y, p)
    assert [r["count"] for r in rel] == [2, 2]
    assert metrics.brier(y, p) == pytest.approx(0.01)
    assert metrics.roc_auc(y, p) == 1.0
    assert metrics.roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3])) is None


def test_route_picks_cheapest_tier_reaching_threshold() -> None:
    scores = np.array([[0.9, 0.9, 0.9], [0.2, 0.7, 0.9], [0.1, 0.2, 0.3]])
    assert threshold_choice(scores, 0.5)[0].tolist() == [0, 1, 2]
    assert threshold_choice(scores, 0.95)[0].tolist() == [2, 2, 2]  # none reaches: dearest
    assert threshold_choice(scores, 0.0)[0].tolist() == [0, 0, 0]


def _toy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 2000
    difficulty = rng.random(n)
    # cheap succeeds on easy prompts, dear on most
    quality = np.stack([(difficulty < 0.4), (difficulty < 0.7), (difficulty < 0.95)], 1).astype(
        float
    )
    return quality, difficulty


def test_oracle_beats_mix_beats_nothing_and_random_is_near_diagonal() -> None:
    quality, difficulty = _toy()
    costs = np.array([0.0, 0.1, 1.0])  # normalized
    oracle = metrics.routing_summary(metrics.sweep(quality, quality, costs), quality)
    rand = metrics.routing_summary(
        metrics.sweep(np.random.default_rng(1).random(quality.shape), quality, costs), quality
    )
    mix = metrics.routing_summary(metrics.mix_curve(quality, costs), quality)
    assert oracle["apgr"] > mix["apgr"] > 0.5
    # the oracle sends 40% to local (cost 0), 30% to mid (0.1), 25% to frontier (1.0) and the
    # 5% that no tier answers to local
    assert oracle["cost_at_100pct_top"] == pytest.approx(0.3 * 0.1 + 0.25 * 1.0, abs=0.01)
    assert rand["apgr"] < mix["apgr"]
    # prompt-agnostic scores under the utility rule trace the best fixed mix exactly
    const = np.tile(quality.mean(axis=0), (len(quality), 1))
    agnostic = metrics.routing_summary(metrics.sweep(const, quality, costs), quality)
    assert agnostic["apgr"] == pytest.approx(mix["apgr"], abs=0.01)
    # the threshold rule over the oracle's scores is worse than the utility rule
    thr = metrics.routing_summary(metrics.sweep(quality, quality, costs, rule="threshold"), quality)
    assert thr["apgr"] <= oracle["apgr"]
    # a router that knows difficulty is close to the oracle
    informed = np.stack([1 - difficulty / 0.4, 1 - difficulty / 0.7, 1 - difficulty / 0.95], 1)
    good = metrics.routing_summary(metrics.sweep(informed, quality, costs), quality)
    assert good["apgr"] > mix["apgr"]


def test_pair_apgr_two_tier_definitions() -> None:
    quality, _ = _toy()
    perfect = metrics.pair_apgr(quality, quality, 0, 2)
    random = metrics.pair_apgr(np.random.default_rng(2).random(quality.shape), quality, 0, 2)
    # only the 55% of prompts that frontier answers and local does not need the strong model:
    # PGR rises linearly from (0, 0) to (0.55, 1), then stays: area = 0.55 / 2 + 0.45
    assert perfect["apgr"] == pytest.approx(0.725, abs=0.01)
    assert perfect["cpt50"] == pytest.approx(0.275, abs=0.01)
    assert random["apgr"] == pytest.approx(0.5, abs=0.05)
    # no gap between the two tiers: nothing to recover, nothing reported
    same = np.stack([quality[:, 0], quality[:, 0]], 1)
    assert metrics.pair_apgr(same, same, 0, 1)["apgr"] is None


def test_mix_curve_drops_dominated_middle_tier() -> None:
    quality = np.array([[0.5, 0.52, 0.74]] * 10)
    curve = metrics.mix_curve(quality, np.array([0.0, 0.1, 1.0]))
    assert curve.cost.tolist() == [0.0, 1.0]
    good_mid = metrics.mix_curve(np.array([[0.3, 0.7, 0.74]] * 10), np.array([0.0, 0.1, 1.0]))
    assert len(good_mid.cost) == 3


def test_cost_to_reach_interpolates() -> None:
    x = np.array([0.0, 0.5, 1.0])
    y = np.array([0.0, 0.4, 1.0])
    assert metrics.cost_to_reach(x, y, 0.7) == pytest.approx(0.75)
    assert metrics.cost_to_reach(x, y, 1.1) is None


def test_platt_fixes_overconfidence() -> None:
    rng = np.random.default_rng(3)
    true_p = rng.random(5000)
    y = (rng.random(5000) < true_p).astype(float)
    logits = 4.0 * np.log(true_p / (1 - true_p))  # overconfident by a factor of 4
    mask = np.ones_like(logits)
    a, b = fit_platt(logits[:, None], y[:, None], mask[:, None])
    assert a[0] == pytest.approx(0.25, abs=0.03) and b[0] == pytest.approx(0.0, abs=0.1)
    before = metrics.ece(y, 1 / (1 + np.exp(-logits)))
    after = metrics.ece(y, apply_platt(logits[:, None], a, b)[:, 0])
    assert after < 0.03 < before
