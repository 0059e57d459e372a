"""Flow-matching schedule, parameterisations, losses and samplers (engine.diffusion)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from engine import diffusion as fm

# --- analytic flow: data x0 ~ N(mu, sd^2) per dimension, noise e ~ N(0, 1) ----------------------


class GaussianFlow:
    """For Gaussian data the exact velocity E[e - x0 | x_s] and the exact ODE map are known.

    The probability-flow ODE transports e at s = 1 to x0 = mu + sd * e at s = 0.
    """

    def __init__(self, dims: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(dims, generator=g, dtype=torch.float64)
        self.sd = 0.5 + 0.5 * torch.rand(dims, generator=g, dtype=torch.float64)
        self.calls = 0

    def velocity(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = s.reshape(-1, 1)
        var = (1 - s) ** 2 * self.sd**2 + s**2
        return (s - (1 - s) * self.sd**2) / var * (x - (1 - s) * self.mu) - self.mu

    def exact(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mu + self.sd * noise


def _noise(batch=8, dims=64, seed=1):
    return fm.initial_noise((batch, dims), torch.Generator().manual_seed(seed), dtype=torch.float64)


def _error(flow, noise, **kwargs):
    return (fm.sample(flow.velocity, noise, **kwargs) - flow.exact(noise)).abs().max().item()


def test_euler_converges_to_the_exact_flow():
    flow, noise = GaussianFlow(), _noise()
    steps = (5, 10, 20, 40, 80, 160)
    errors = [_error(flow, noise, steps=n, solver="euler") for n in steps]
    # first order: doubling the steps about halves the error
    assert all(1.7 < a / b < 2.3 for a, b in zip(errors[1:], errors[2:])), errors
    assert errors[-1] < 0.05


def test_second_order_solver_beats_euler_at_10_steps():
    flow, noise = GaussianFlow(), _noise()
    euler = _error(flow, noise, steps=10, solver="euler")
    dpm = _error(flow, noise, steps=10, solver="dpm++2m")
    assert dpm < 0.7 * euler, (dpm, euler)
    assert _error(flow, noise, steps=50, solver="dpm++2m") < dpm / 5


def test_dpmpp_2m_matches_diffusers_on_the_same_sigmas():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=3.0, lower_order_final=True, final_sigmas_type="zero",
    )
    sched.set_timesteps(10)
    flow, noise = GaussianFlow(), _noise()
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        s = torch.full((x.shape[0],), float(sched.sigmas[i]), dtype=x.dtype)
        x = sched.step(flow.velocity(x, s), t, x).prev_sample
    ours = fm.sample(flow.velocity, noise, solver="dpm++2m", sigmas=sched.sigmas.double())
    assert torch.allclose(x, ours, atol=1e-5)


def test_one_step_is_x0_from_v_at_pure_noise():
    flow, noise = GaussianFlow(), _noise()
    expected = noise - flow.velocity(noise, torch.ones(noise.shape[0], dtype=noise.dtype))
    for solver in fm.SOLVERS:
        assert torch.equal(fm.sample(flow.velocity, noise, steps=1, solver=solver), expected)


def test_solvers_call_the_model_once_per_step():
    for solver in fm.SOLVERS:
        flow = GaussianFlow()
        fm.sample(flow.velocity, _noise(), steps=7, solver=solver)
        assert flow.calls == 7


def test_sampling_is_deterministic_given_the_seed():
    flow = GaussianFlow()
    a = fm.sample(flow.velocity, _noise(seed=5), steps=10, solver="dpm++2m")
    b = fm.sample(flow.velocity, _noise(seed=5), steps=10, solver="dpm++2m")
    c = fm.sample(flow.velocity, _noise(seed=6), steps=10, solver="dpm++2m")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_callback_reports_each_step_and_cancel_stops_between_steps():
    flow, seen = GaussianFlow(), []
    fm.sample(flow.velocity, _noise(), steps=4, callback=lambda i, n, s, x: seen.append((i, n, s)))
    expected_s = fm.sampling_sigmas(4).tolist()[1:]
    assert [(i, n) for i, n, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [s for _, _, s in seen] == pytest.approx(expected_s)

    flow = GaussianFlow()
    with pytest.raises(fm.SamplingCancelled, match="before step 3 of 10"):
        fm.sample(flow.velocity, _noise(), steps=10, should_cancel=lambda: flow.calls >= 2)
    assert flow.calls == 2


def test_epsilon_and_x0_models_sample_through_the_conversions():
    """Exact epsilon/x0 predictors, converted to velocities, follow the same flow."""
    flow, noise = GaussianFlow(), _noise()
    reference = fm.sample(flow.velocity, noise, steps=40)
    sigmas = fm.sampling_sigmas(40).clamp(max=0.999)
    for prediction in ("epsilon", "x0"):
        def velocity(x, s, p=prediction):
            predicted = fm.convert(flow.velocity(x, s), x, s, "v", p)  # what the model outputs
            return fm.to_velocity(predicted, x, s, p)

        out = fm.sample(velocity, noise, sigmas=sigmas)
        assert (out - reference).abs().max() < 0.02


def test_sampler_uses_the_velocity_it_is_given():
    """A constant velocity field moves the sample by exactly -v over s: 1 -> 0."""
    v = torch.full((2, 3), 0.5, dtype=torch.float64)
    noise = torch.zeros(2, 3, dtype=torch.float64)
    for solver in fm.SOLVERS:
        out = fm.sample(lambda x, s: v, noise, steps=10, solver=solver)
        assert torch.allclose(out, -v)


# --- schedule ------------------------------------------------------------------------------------


def test_wan_10_step_schedule_with_shift_3():
    wan = [1, 0.9643, 0.9231, 0.875, 0.8182, 0.75, 0.6667, 0.5625, 0.4286, 0.25, 0]
    assert fm.sampling_sigmas(10, 3.0).tolist() == pytest.approx(wan, abs=1e-4)


def test_schedule_matches_diffusers_euler_with_explicit_sigmas():
    diffusers = pytest.importorskip("diffusers")
    import numpy as np

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1, 0, 11)[:10])
    assert sched.sigmas.double().numpy() == pytest.approx(fm.sampling_sigmas(10).numpy(), abs=1e-6)
    # and the same Euler trajectory for the same velocity field
    flow, noise = GaussianFlow(), _noise()
    x = noise.clone()
    for t in sched.timesteps:
        s = torch.full((x.shape[0],), float(t) / 1000, dtype=x.dtype)
        x = sched.step(flow.velocity(x, s), t, x).prev_sample
    assert torch.allclose(x, fm.sample(flow.velocity, noise, steps=10), atol=1e-5)


def test_shift_and_model_timestep():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert fm.shift_sigma(s, 3.0).tolist() == pytest.approx([0, 0.5, 0.75, 1])
    assert fm.shift_sigma(s, 1.0).tolist() == pytest.approx(s.tolist())
    assert fm.model_timestep(torch.tensor([0.25])).item() == 250.0
    with pytest.raises(ValueError, match="shift"):
        fm.shift_sigma(s, 0.0)
    with pytest.raises(ValueError, match="steps"):
        fm.sampling_sigmas(0)


def test_training_sigmas_are_seeded_shifted_and_in_range():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = fm.sample_training_sigmas(4096, g1)
    assert torch.equal(a, fm.sample_training_sigmas(4096, g2))
    assert a.min() > 0 and a.max() <= 1
    table = fm.shift_sigma(torch.arange(1, 1001) / 1000)
    assert torch.isin(a, table).all()
    assert a.median() > 0.6  # shift 3 moves half the mass above 0.75
    cont = fm.sample_training_sigmas(64, torch.Generator().manual_seed(0), num_timesteps=None)
    assert not torch.isin(cont, table).any()


# --- parameterisations and losses ----------------------------------------------------------------


def _triple(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    s = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    return x0, noise, s


def test_add_noise_and_targets_follow_the_flow_definition():
    x0, noise, s = _triple()
    x_s = fm.add_noise(x0, noise, s)
    assert torch.allclose(x_s[1], 0.7 * x0[1] + 0.3 * noise[1])
    assert torch.equal(fm.add_noise(x0, noise, 0.0), x0)
    assert torch.equal(fm.add_noise(x0, noise, 1.0), noise)
    assert torch.equal(fm.training_target(x0, noise, "v"), noise - x0)
    assert torch.equal(fm.training_target(x0, noise, "epsilon"), noise)
    assert torch.equal(fm.training_target(x0, noise, "x0"), x0)


@pytest.mark.parametrize("source", fm.PREDICTIONS)
@pytest.mark.parametrize("target", fm.PREDICTIONS)
def test_conversions_are_exact_and_round_trip(source, target):
    x0, noise, s = _triple()
    x_s = fm.add_noise(x0, noise, s)
    pred = fm.training_target(x0, noise, source)
    converted = fm.convert(pred, x_s, s, source, target)
    assert torch.allclose(converted, fm.training_target(x0, noise, target), atol=1e-10)
    assert torch.allclose(fm.convert(converted, x_s, s, target, source), pred, atol=1e-10)


def test_conversions_stay_finite_at_the_ends_of_the_schedule():
    x0, noise, _ = _triple()
    for s in (0.0, 1.0):
        x_s = fm.add_noise(x0, noise, s)
        for src in fm.PREDICTIONS:
            for dst in fm.PREDICTIONS:
                pred = fm.training_target(x0, noise, src)
                assert torch.isfinite(fm.convert(pred, x_s, s, src, dst)).all()


def test_loss_is_mse_to_the_target_restricted_to_the_mask():
    x0, noise, _ = _triple()
    for p in fm.PREDICTIONS:
        assert fm.flow_matching_loss(fm.training_target(x0, noise, p), x0, noise, p) == 0
    pred = noise - x0
    pred[:, 0] += 2.0  # wrong only in "slot" 0
    mask = torch.zeros(1, 3, 1, dtype=torch.bool)
    mask[0, 1:] = True
    assert fm.flow_matching_loss(pred, x0, noise, "v", mask=mask) == 0
    assert fm.flow_matching_loss(pred, x0, noise, "v", mask=~mask).item() == pytest.approx(4.0)
    assert fm.flow_matching_loss(pred, x0, noise, "v").item() == pytest.approx(4.0 / 3)
    with pytest.raises(ValueError, match="selects no elements"):
        fm.flow_matching_loss(pred, x0, noise, "v", mask=torch.zeros(1, 3, 1, dtype=torch.bool))


def test_bad_names_and_shapes_are_rejected():
    x0, noise, s = _triple()
    with pytest.raises(ValueError, match="prediction type 'score'"):
        fm.training_target(x0, noise, "score")
    with pytest.raises(ValueError, match="solver 'heun'"):
        fm.sample(GaussianFlow().velocity, _noise(), solver="heun")
    with pytest.raises(ValueError, match="shape"):
        fm.add_noise(x0, noise, torch.ones(3))
    for bad in ([1.0, 0.5], [1.5, 0.5, 0.0], [1.0, 1.0, 0.0], [0.0]):
        with pytest.raises(ValueError, match="decrease strictly from <= 1 to 0"):
            fm.sample(GaussianFlow().velocity, _noise(), sigmas=torch.tensor(bad))


def test_diffusion_module_never_imports_models():
    tree = ast.parse(Path(fm.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith("engine") for m in imported), imported
