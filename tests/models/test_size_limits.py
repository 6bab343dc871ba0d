"""models.spec.plan.size_problem: the one size check the API (every spec, a space's corners) and the workers (each sampled configuration) make."""

from __future__ import annotations

from models.spec.plan import NetworkPlan, size_problem


def plan(params: int, flops: int) -> NetworkPlan:
    return NetworkPlan(layers=(), params=params, flops=flops)


def test_a_network_at_both_limits_fits():
    assert size_problem(plan(1000, 5000), max_params=1000, max_flops_per_sample=5000) is None


def test_one_parameter_too_many_names_the_count_the_limit_and_the_setting():
    problem = size_problem(plan(1001, 5000), max_params=1000, max_flops_per_sample=5000)
    assert problem is not None and "1,001 parameters" in problem and "at most 1,000" in problem and "CONVTUNE_MAX_PARAMS" in problem


def test_one_flop_too_many_names_the_flops_setting():
    problem = size_problem(plan(1000, 5001), max_params=1000, max_flops_per_sample=5000)
    assert problem is not None and "5,001 FLOPs per sample" in problem and "CONVTUNE_MAX_FLOPS_PER_SAMPLE" in problem


def test_the_parameters_are_named_first_when_both_are_over():
    assert "CONVTUNE_MAX_PARAMS" in size_problem(plan(2000, 9000), max_params=1000, max_flops_per_sample=5000)
