"""CG's preconditioner="auto": plain CG, EK-FAC where plain CG projects a long solve, deflated
mid-solve only where the measured convergence and the measured costs say it pays; exact either
way."""

from __future__ import annotations

import math

import pytest
import torch

import influencekit as ik
from influencekit.solvers import adaptive
from influencekit.solvers.deflated import heaviest_count

from conftest import Problem, make_logreg, make_mlp, make_operator, relative_error


@pytest.fixture(scope="module")
def wide_mlp() -> Problem:
    return make_mlp(hidden=20)  # p = 163


@pytest.fixture
def fixed_costs(monkeypatch: pytest.MonkeyPatch):
    """Replace the timed costs by given ones, so that a decision does not depend on how fast
    this machine happens to be (on a model this small, timings are mostly overhead)."""
    def use(product: float = 1.0, apply: float = 0.0) -> None:
        costs = adaptive.StepCosts(product=product, apply=apply)
        monkeypatch.setattr(ik.CG, "_step_costs", lambda self: costs)

    return use


def _solve(problem: Problem, damping: float, preconditioner: str | None, block: bool,
           k: int = 60) -> tuple[ik.CG, torch.Tensor, torch.Tensor]:
    op = make_operator(problem, damping=damping)
    V = torch.randn(k, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = ik.CG(tol=1e-10, preconditioner=preconditioner, block=block).prepare(op)
    expected = torch.linalg.solve(problem.dense_hessian(damping), V.T).T
    return solver, solver.solve(V), expected


# ------------------------------------------------------------------ the rule, in closed form

def test_projected_iterations_follow_the_last_contraction() -> None:
    # ρ = 0.01 / 0.1 = 0.1: from 1e-2 to 1e-6 takes 4 more iterations
    assert adaptive.projected_iterations(0.1, 0.01, 1e-6) == 4
    assert adaptive.projected_iterations(0.1, 0.05, 1e-6) == math.ceil(
        math.log(1e-6 / 0.05) / math.log(0.5))
    assert adaptive.projected_iterations(0.1, 1e-7, 1e-6) == 0  # converged
    assert adaptive.projected_iterations(0.1, 0.1, 1e-6) == math.inf  # stalled


def test_the_first_contraction_is_discounted() -> None:
    # ρ = 0.3 from r_0 = 1: ⌈log(2e-4 / 0.3) / log 0.3⌉ = 7 at that rate, 3 as counted
    assert adaptive.projected_iterations(1.0, 0.3, 2e-4) == 7
    assert adaptive.remaining_iterations(1.0, 0.3, 2e-4, iteration=1) == math.ceil(
        7 / adaptive.FIRST_CONTRACTION_OVERSTATES)
    assert adaptive.remaining_iterations(1.0, 0.3, 2e-4, iteration=2) == 7
    assert adaptive.remaining_iterations(0.3, 0.3, 2e-4, iteration=1) == math.inf


def test_the_lanczos_run_is_priced_in_measured_seconds() -> None:
    costs = adaptive.StepCosts(product=0.01, apply=0.002)
    # 160 products on 300 of 1,200 examples at 2x the per-vector price, each followed by one
    # application, times the orthogonalisation's share
    expected = 160 * (0.01 * 0.25 * adaptive.LANCZOS_BLOCK_COST + 0.002) \
        * adaptive.REORTHOGONALISATION
    assert adaptive.lanczos_seconds(300, 1200, 10_000, costs) == pytest.approx(expected)
    # a model with fewer parameters than 2·RANK stops the run at p products
    assert adaptive.lanczos_seconds(300, 1200, 50, costs) == pytest.approx(expected * 50 / 160)


def test_deflation_is_planned_only_where_its_lanczos_run_pays() -> None:
    settings = {"subset": 300, "num_train": 1200, "dim": 10_000,
                "costs": adaptive.StepCosts(product=0.01, apply=0.002)}
    lanczos = adaptive.lanczos_seconds(**settings)  # 1.68 s
    # 100 columns, 7 iterations left: 0.35·7·100·0.012 = 2.94 s saved
    plan = adaptive.plan_deflation(7, 100, **settings)
    assert lanczos < 0.35 * 7 * 100 * 0.012
    assert plan is not None and plan.projected == 7 and not plan.upfront
    assert (plan.rank, plan.iterations, plan.subset) == (adaptive.RANK, 2 * adaptive.RANK, 300)
    # a single column saves 0.03 s: not worth it
    assert adaptive.plan_deflation(7, 1, **settings) is None
    # one iteration left: nothing to save
    assert adaptive.plan_deflation(1, 100, **settings) is None
    # CG that can take at most one more iteration: nothing to save either
    assert adaptive.plan_deflation(7, 100, **settings, most=1) is None
    # the same solve where EK-FAC is dear next to a product: the run's applications outweigh
    dear = {**settings, "costs": adaptive.StepCosts(product=0.001, apply=0.01)}
    assert adaptive.plan_deflation(3, 100, **dear) is None


def test_the_lanczos_subset_is_the_fewest_heaviest_examples_carrying_the_mass() -> None:
    weights = torch.tensor([1.0, 4.0, 2.0, 3.0])  # total 10; heaviest first 4, 3, 2, 1
    assert heaviest_count(weights, 0.7) == 2  # 4 + 3 = 7
    assert heaviest_count(weights, 0.71) == 3
    assert heaviest_count(weights, 1.0) == 4
    assert heaviest_count(torch.zeros(5), 0.9) == 5


# ------------------------------------------------------------------ CG with "auto"

@pytest.mark.parametrize("block", [True, False])
def test_auto_deflates_a_slow_solve_and_stays_exact(wide_mlp: Problem, block: bool,
                                                     fixed_costs) -> None:
    """With 60 independent recurrences plain CG needs 79 iterations and EK-FAC alone 71 at
    damping 1e-4; plain CG's first iteration projects far more than PLAIN_AT_MOST, so auto
    moves to EK-FAC, whose measured convergence then triggers the deflation, which cuts them;
    the answer still equals the dense float64 solve."""
    fixed_costs(product=1.0, apply=0.0)
    auto, X, expected = _solve(wide_mlp, 1e-4, "auto", block=block)
    assert relative_error(X, expected) < 1e-8
    if not block:
        ekfac, _, _ = _solve(wide_mlp, 1e-4, "ekfac", block=False)
        plain, _, _ = _solve(wide_mlp, 1e-4, None, block=False)
        assert auto.deflation_ is not None
        report = auto.last_report
        assert report.details["plain_projected"] > adaptive.PLAIN_AT_MOST
        assert report.details["ekfac_after_iteration"] == adaptive.DECIDE_FROM
        assert report.iterations < plain.last_report.iterations
        assert report.details["deflated_after_iteration"] >= adaptive.DECIDE_FROM
        assert report.details["deflated_rank"] == adaptive.RANK
        assert any("deflated at 80 Ritz pairs" in note for note in report.notes)
        assert report.iterations < ekfac.last_report.iterations
        assert report.details["products"] < ekfac.last_report.details["products"]


def test_the_costs_are_measured_once_and_kept(wide_mlp: Problem) -> None:
    """Timed on this machine in the first solve (positive seconds, in the notes), then reused:
    a second solve of the same right-hand sides takes the same path, whatever it decided."""
    op = make_operator(wide_mlp, damping=1e-4)
    V = torch.randn(60, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # independent recurrences: plain CG projects a long solve, so EK-FAC is applied (and timed)
    solver = ik.CG(tol=1e-10, preconditioner="auto", block=False).prepare(op)
    first = solver.solve(V)
    costs = solver.fitted_state()[1]["auto_costs"]
    assert costs["product"] > 0 and costs["apply"] > 0
    assert any("ms per product" in note for note in solver.last_report.notes)
    assert torch.equal(solver.solve(V), first)
    assert solver.fitted_state()[1]["auto_costs"] == costs
    expected = torch.linalg.solve(wide_mlp.dense_hessian(1e-4), V.T).T
    assert relative_error(first, expected) < 1e-8


def test_auto_stays_plain_where_plain_cg_converges_fast(wide_mlp: Problem) -> None:
    """10 right-hand sides (a narrow block) at damping 10: plain block CG's first iteration
    projects 3 more, so auto never fits its way into EK-FAC or a Lanczos run, and the solve is
    plain block CG to the bit."""
    auto, X, expected = _solve(wide_mlp, 10.0, "auto", block=True, k=10)
    _, X_plain, _ = _solve(wide_mlp, 10.0, None, block=True, k=10)
    details = auto.last_report.details
    assert auto.deflation_ is None
    assert details["plain_projected"] <= adaptive.PLAIN_AT_MOST
    assert math.isnan(details["ekfac_after_iteration"])
    assert math.isnan(details["deflated_after_iteration"])
    assert any("none (plain CG throughout" in note for note in auto.last_report.notes)
    assert torch.equal(X, X_plain)
    assert relative_error(X, expected) < 1e-8


def test_a_narrow_block_moves_to_ekfac_when_plain_cg_projects_a_long_solve(
        wide_mlp: Problem, fixed_costs) -> None:
    """10 right-hand sides at damping 1e-4: plain CG's first iteration projects 16 more, so the
    solve moves to EK-FAC after that iteration (here EK-FAC alone, 19 iterations as plain CG
    takes: on this small model it does not help), and the answer is exact."""
    fixed_costs(product=1.0, apply=0.0)
    auto, X, expected = _solve(wide_mlp, 1e-4, "auto", block=True, k=10)
    details = auto.last_report.details
    assert details["plain_projected"] > adaptive.PLAIN_AT_MOST
    assert details["ekfac_after_iteration"] == adaptive.DECIDE_FROM
    assert any("then EK-FAC" in note for note in auto.last_report.notes)
    assert relative_error(X, expected) < 1e-8


def test_every_solve_decides_anew_so_answers_do_not_depend_on_earlier_solves(
        wide_mlp: Problem, fixed_costs) -> None:
    fixed_costs(product=1.0, apply=0.0)
    op = make_operator(wide_mlp, damping=1e-4)
    generator = torch.Generator().manual_seed(1)
    V = torch.randn(60, op.dim, dtype=torch.float64, generator=generator)
    fresh = ik.CG(tol=1e-10, preconditioner="auto", block=False).prepare(op)
    first = fresh.solve(V)
    assert fresh.deflation_ is not None  # built by the first solve
    again = fresh.solve(V)  # the deflation is reused, the path is the same
    assert torch.equal(first, again)
    assert fresh.last_report.details["deflated_after_iteration"] >= adaptive.DECIDE_FROM


def test_an_indefinite_subset_falls_back_to_all_examples(wide_mlp: Problem,
                                                           fixed_costs) -> None:
    """On a non-convex model the heaviest examples' curvature alone can be indefinite (here at
    damping 1e-4) while the whole sum is not: the Lanczos run then takes every example."""
    fixed_costs(product=1.0, apply=0.0)
    auto, X, expected = _solve(wide_mlp, 1e-4, "auto", block=False)
    assert auto.deflation_ is not None and auto.deflation_.subset == wide_mlp.X.shape[0]
    assert relative_error(X, expected) < 1e-8


def test_a_prepared_base_is_deflated_as_prepare_would(mlp: Problem) -> None:
    op = make_operator(mlp, damping=0.01)
    eye = torch.eye(op.dim, dtype=torch.float64)
    settings = {"rank": 6, "iterations": 16, "block": 4}
    prepared = ik.solvers.Deflated(**settings).prepare(op)
    base = ik.solvers.EKFAC().prepare(op)
    deflated = ik.solvers.Deflated(**settings).deflate(base)
    torch.testing.assert_close(deflated.apply_inverse(eye), prepared.apply_inverse(eye),
                               rtol=1e-12, atol=1e-14)


def test_subset_mass_picks_the_heaviest_examples(mlp: Problem) -> None:
    op = make_operator(mlp, damping=0.01)
    eye = torch.eye(op.dim, dtype=torch.float64)
    size = heaviest_count(op.curvature_weights(), 0.8)
    assert 0 < size < op.num_train
    by_mass = ik.solvers.Deflated(rank=6, iterations=16, block=4, subset_mass=0.8).prepare(op)
    by_count = ik.solvers.Deflated(rank=6, iterations=16, block=4, subset=size).prepare(op)
    assert by_mass.subset_size_ == size
    torch.testing.assert_close(by_mass.apply_inverse(eye), by_count.apply_inverse(eye),
                               rtol=1e-12, atol=1e-14)
    with pytest.raises(ik.InvalidSettingError, match="not both"):
        ik.solvers.Deflated(subset=10, subset_mass=0.5)
    with pytest.raises(ValueError, match="subset_mass must be"):
        ik.solvers.Deflated(subset_mass=0.0)


def test_a_saved_fit_keeps_the_deflation_a_solve_built(wide_mlp: Problem, tmp_path,
                                                        fixed_costs) -> None:
    fixed_costs(product=1.0, apply=0.0)
    def solver() -> ik.CG:
        return ik.CG(tol=1e-10, preconditioner="auto", block=False)

    inf = ik.Influence(wide_mlp.model, wide_mlp.objective, wide_mlp.train, solver=solver(),
                       damping=1e-4).fit()
    scores = inf.influence(wide_mlp.test)
    assert inf.solver.deflation_ is not None
    inf.save(tmp_path)
    loaded = ik.Influence.load(tmp_path, wide_mlp.model, wide_mlp.objective, wide_mlp.train)
    assert loaded.solver.deflation_ == inf.solver.deflation_
    assert torch.equal(loaded.influence(wide_mlp.test), scores)


# ------------------------------------------------------------------ CG(negligible=ε)

def test_the_data_term_alone_is_the_product_without_the_shift(mlp: Problem) -> None:
    op = make_operator(mlp, damping=0.01)
    V = torch.randn(3, op.dim, dtype=torch.float64)
    shift = mlp.objective.weight_decay + 0.01
    torch.testing.assert_close(op.matvec(V, shifted=False), op.matvec(V) - shift * V,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [True, False])
def test_leaving_out_light_examples_still_meets_tol_on_the_full_operator(
        logreg: Problem, block: bool) -> None:
    """On a convex model A_S stays positive definite: phase 1 runs on the heaviest examples,
    phase 2 adds the left-out curvature to the residual and finishes on A; the answer equals
    the dense solve over every example."""
    op = make_operator(logreg, damping=1e-3)
    V = torch.randn(20, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = torch.linalg.solve(logreg.dense_hessian(1e-3), V.T).T
    for negligible in (1e-2, 0.3):
        solver = ik.CG(tol=1e-10, preconditioner="ekfac", block=block, negligible=negligible)
        X = solver.prepare(op).solve(V)
        report = solver.last_report
        assert report.converged and report.relative_residual <= 1e-10
        assert relative_error(X, expected) < 1e-8
        left_out = report.details["examples_left_out"]
        weights = op.curvature_weights()
        assert left_out == op.num_train - heaviest_count(weights, 1 - negligible)
        assert 0 < left_out < op.num_train
        assert any(f"{int(left_out)} of {op.num_train} training examples" in note
                   for note in report.notes)


def test_the_second_phase_is_judged_on_its_own_residuals() -> None:
    """Phase 2 of negligible > 0 starts from the residual on the full operator, far above
    where phase 1 ended on A_S. That jump is no stall: block CG over many right-hand sides
    stays plain in both phases, as it does without the split (it used to switch to EK-FAC
    after phase 2's first iteration, comparing that residual with phase 1's last ones)."""
    problem = make_logreg(n=400, d=30, classes=6, weight_decay=1e-4, seed=1)  # p = 180
    op = make_operator(problem, damping=1e-4)
    V = torch.randn(40, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = torch.linalg.solve(problem.dense_hessian(1e-4), V.T).T
    for negligible in (0.0, 0.05, 0.3):
        solver = ik.CG(tol=1e-10, preconditioner="auto", negligible=negligible).prepare(op)
        X = solver.solve(V)
        report = solver.last_report
        assert relative_error(X, expected) < 1e-8
        assert math.isnan(report.details["ekfac_after_iteration"]), report.notes
        assert ("examples_left_out" in report.details) == (negligible > 0)


def test_an_indefinite_heaviest_part_is_refused_and_every_example_used(
        wide_mlp: Problem) -> None:
    op = make_operator(wide_mlp, damping=1e-3)
    V = torch.randn(30, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    solver = ik.CG(tol=1e-10, preconditioner="ekfac", negligible=0.5).prepare(op)
    X = solver.solve(V)
    assert relative_error(X, torch.linalg.solve(wide_mlp.dense_hessian(1e-3), V.T).T) < 1e-8
    assert "examples_left_out" not in solver.last_report.details
    assert any("indefinite" in note for note in solver.last_report.notes)


def test_negligible_must_be_a_share_below_one() -> None:
    with pytest.raises(ValueError, match="negligible must be"):
        ik.CG(negligible=1.0)


def test_the_curvature_weights_are_computed_once(wide_mlp: Problem, fixed_costs) -> None:
    """The negligible split, the Lanczos subset and the deflation share one pass for the
    weights."""
    from unittest import mock

    from influencekit.curvature import HessianOperator

    fixed_costs(product=1.0, apply=0.0)
    op = make_operator(wide_mlp, damping=1e-4)
    V = torch.randn(60, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    original = HessianOperator.curvature_weights
    with mock.patch.object(HessianOperator, "curvature_weights", autospec=True,
                           side_effect=original) as weights:
        solver = ik.CG(tol=1e-8, preconditioner="auto", block=False,
                       negligible=1e-6).prepare(op)
        solver.solve(V)
        solver.solve(V)
    assert solver.deflation_ is not None
    assert weights.call_count == 1


def test_plain_block_cg_counts_as_stalled_only_when_two_iterations_barely_shrink_it() -> None:
    assert not adaptive.stalled([1.0, 0.95])  # one iteration says nothing yet
    # the SiLU MLP's first iterations: 1 → 1.02 → 0.73 → 0.33: (0.73 / 1)^½ = 0.85, not stalled
    assert not adaptive.stalled([1.0, 1.019, 0.7275])
    assert not adaptive.stalled([1.0, 1.019, 0.7275, 0.3294])
    # 1 → 0.95 → 0.9: (0.9 / 1)^½ ≈ 0.949 > STALLED
    assert adaptive.stalled([1.0, 0.95, 0.9])
    assert adaptive.stalled([0.2, 0.3, 0.19])


def test_wide_blocks_stay_plain_and_move_to_ekfac_only_when_plain_cg_stalls(
        wide_mlp: Problem, monkeypatch: pytest.MonkeyPatch) -> None:
    """60 right-hand sides (≥ PLAIN_WIDTH) in one block: plain CG throughout, whatever its first
    contraction; with the stall threshold set below every contraction, the same solve moves to
    EK-FAC after its second iteration and still equals the dense solve."""
    auto, X, expected = _solve(wide_mlp, 1e-4, "auto", block=True)
    assert any("over 32 or more right-hand sides throughout" in n for n in auto.last_report.notes)
    monkeypatch.setattr(adaptive, "STALLED", 0.0)
    auto, X, expected = _solve(wide_mlp, 1e-4, "auto", block=True)
    assert auto.last_report.details["ekfac_after_iteration"] == 2
    assert any("plain block CG stalled" in n for n in auto.last_report.notes)
    assert relative_error(X, expected) < 1e-8


def test_auto_fits_ekfac_only_when_a_solve_moves_to_it(wide_mlp: Problem, tmp_path,
                                                       fixed_costs) -> None:
    """A solve that stays plain fits no EK-FAC, and a fit saved then loads without one; the
    first solve that moves to EK-FAC fits it there, and is exact."""
    from unittest import mock

    fixed_costs(product=1.0, apply=0.0)
    inf = ik.Influence(wide_mlp.model, wide_mlp.objective, wide_mlp.train,
                       solver=ik.CG(tol=1e-10, preconditioner="auto"), damping=10.0).fit()
    with mock.patch.object(ik.solvers.EKFAC, "prepare", autospec=True,
                           side_effect=ik.solvers.EKFAC.prepare) as fits:
        inf.solver.solve(torch.randn(10, inf.solver.operator.dim, dtype=torch.float64))
        assert fits.call_count == 0  # damping 10: plain CG converges fast
        assert "preconditioner" not in inf.solver.fitted_state()[1]
        inf.save(tmp_path)
        loaded = ik.Influence.load(tmp_path, wide_mlp.model, wide_mlp.objective,
                                   wide_mlp.train)
        op = loaded.solver.operator
        V = torch.randn(10, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        loaded.solver.solve(V)
        assert fits.call_count == 0
        # the same solver on a slow problem: independent recurrences at damping 1e-4
        slow = ik.CG(tol=1e-10, preconditioner="auto", block=False).prepare(
            make_operator(wide_mlp, damping=1e-4))
        assert fits.call_count == 0
        V = torch.randn(10, slow.operator.dim, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(4))
        X = slow.solve(V)
        assert fits.call_count == 1
    assert "preconditioner" in slow.fitted_state()[1]
    expected = torch.linalg.solve(wide_mlp.dense_hessian(1e-4), V.T).T
    assert relative_error(X, expected) < 1e-8
