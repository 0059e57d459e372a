"""Flow matching for DiffKT3D: schedule, parameterisations, training targets, samplers.

Conventions (Wan 2.1 / diffusers ``FlowMatchEulerDiscreteScheduler``, seed §B.7, DESIGN §4):

- Flow time ``s`` in [0, 1]: ``s = 0`` is clean data ``x0``, ``s = 1`` is pure noise ``e``.
  The forward process is ``x_s = (1 - s) * x0 + s * e`` with ``e ~ N(0, I)``.
- The velocity is ``v = dx_s/ds = e - x0``; then ``x0 = x_s - s * v`` and ``e = x_s + (1 - s) * v``.
- The model is fed the timestep ``1000 * s`` (:func:`model_timestep`); everything in this module
  works on ``s`` itself.
- Shift: ``s' = shift * s / (1 + (shift - 1) * s)`` with ``shift = 3.0`` (Wan 480p, seed §B.7).
  Sampling uses Wan's schedule ``shift(linspace(1, 0, N + 1))``; note that diffusers'
  ``FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(N)`` is *not* that schedule.
- A model predicts one of ``"v"`` (default), ``"epsilon"`` or ``"x0"``; :func:`convert` maps any of
  them to any other given ``x_s`` and ``s``.

Samplers integrate the probability-flow ODE from ``s = 1`` to ``s = 0`` using only a callable
``velocity(x_s, s) -> v`` (``s`` a tensor of shape [B]), so this module never imports a model.
They are deterministic given the initial noise (make it with :func:`initial_noise` and a seeded
``torch.Generator``), report progress through a callback and check a cancel flag between steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["v", "epsilon", "x0"]
Solver = Literal["euler", "dpm++2m"]

PREDICTIONS: tuple[str, ...] = ("v", "epsilon", "x0")
SOLVERS: tuple[str, ...] = ("euler", "dpm++2m")
DEFAULT_SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000

Velocity = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, float, Tensor], None]
"""``callback(step, total, s_next, x)`` after each step; ``step`` counts from 1."""


class SamplingCancelled(Exception):
    """Raised by a sampler when its ``should_cancel()`` check returns True between steps."""


# --- schedule -------------------------------------------------------------------------------


def shift_sigma(s: Tensor, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Wan's time shift ``shift * s / (1 + (shift - 1) * s)``; maps [0, 1] onto [0, 1]."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * s / (1 + (shift - 1) * s)


def model_timestep(s: Tensor) -> Tensor:
    """The timestep the network is conditioned on: ``1000 * s`` (float, Wan convention)."""
    return s * NUM_TRAIN_TIMESTEPS


def sampling_sigmas(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Wan's N-step schedule: ``shift(linspace(1, 0, N + 1))``, float64, first 1.0, last 0.0.

    For 10 steps and shift 3: 1, .9643, .9231, .875, .8182, .75, .6667, .5625, .4286, .25, 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def sample_training_sigmas(
    batch: int,
    generator: torch.Generator | None = None,
    shift: float = DEFAULT_SHIFT,
    num_timesteps: int | None = NUM_TRAIN_TIMESTEPS,
    device: torch.device | str | None = None,
) -> Tensor:
    """Flow times for a training batch, float32 [B]: uniform ``u``, then shifted.

    With ``num_timesteps`` (default 1000, seed §B.7) ``u`` is drawn from the discrete table
    ``{1/N, 2/N, ..., 1}``; with ``None`` it is continuous U(0, 1).
    """
    if num_timesteps is None:
        u = torch.rand(batch, generator=generator, device=device)
    else:
        k = torch.randint(1, num_timesteps + 1, (batch,), generator=generator, device=device)
        u = k.float() / num_timesteps
    return shift_sigma(u, shift)


def _expand(s: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast per-sample flow times [B] (or a scalar) against ``like`` [B, ...]."""
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != like.shape[0]:
        raise ValueError(f"s must be a scalar or shape [{like.shape[0]}], got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, s: Tensor | float) -> Tensor:
    """``x_s = (1 - s) * x0 + s * noise``; ``s`` scalar or per sample [B]."""
    se = _expand(s, x0)
    return (1 - se) * x0 + se * noise


def initial_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise to start sampling from; pass a seeded generator for reproducibility."""
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


# --- parameterisations -------------------------------------------------------------------------

# Denominators (1 - s) and s vanish at the ends of the schedule: epsilon -> x0 is undefined at
# s = 1 and x0 -> epsilon at s = 0. They are clamped so results stay finite; sample with an
# epsilon-model from s slightly below 1 if that matters.
_MIN_DENOMINATOR = 1e-5


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def training_target(x0: Tensor, noise: Tensor, prediction: Prediction = "v") -> Tensor:
    """What a model of the given type must output for ``x_s = add_noise(x0, noise, s)``."""
    _check_prediction(prediction)
    if prediction == "v":
        return noise - x0
    if prediction == "epsilon":
        return noise
    return x0


def to_x0(pred: Tensor, x_s: Tensor, s: Tensor | float, prediction: Prediction) -> Tensor:
    """Clean-data estimate from a model output of type ``prediction`` at ``(x_s, s)``."""
    _check_prediction(prediction)
    se = _expand(s, x_s)
    if prediction == "v":
        return x_s - se * pred
    if prediction == "epsilon":
        return (x_s - se * pred) / (1 - se).clamp_min(_MIN_DENOMINATOR)
    return pred


def to_epsilon(pred: Tensor, x_s: Tensor, s: Tensor | float, prediction: Prediction) -> Tensor:
    """Noise estimate from a model output of type ``prediction`` at ``(x_s, s)``."""
    _check_prediction(prediction)
    se = _expand(s, x_s)
    if prediction == "v":
        return x_s + (1 - se) * pred
    if prediction == "epsilon":
        return pred
    return (x_s - (1 - se) * pred) / se.clamp_min(_MIN_DENOMINATOR)


def to_velocity(pred: Tensor, x_s: Tensor, s: Tensor | float, prediction: Prediction) -> Tensor:
    """Velocity ``e - x0`` from a model output of type ``prediction`` at ``(x_s, s)``."""
    _check_prediction(prediction)
    if prediction == "v":
        return pred
    se = _expand(s, x_s)
    if prediction == "epsilon":
        return (pred - x_s) / (1 - se).clamp_min(_MIN_DENOMINATOR)
    return (x_s - pred) / se.clamp_min(_MIN_DENOMINATOR)


def convert(
    pred: Tensor, x_s: Tensor, s: Tensor | float, source: Prediction, target: Prediction
) -> Tensor:
    """Convert a model output from parameterisation ``source`` to ``target``."""
    _check_prediction(target)
    if target == "v":
        return to_velocity(pred, x_s, s, source)
    if target == "epsilon":
        return to_epsilon(pred, x_s, s, source)
    return to_x0(pred, x_s, s, source)


def flow_matching_loss(
    pred: Tensor,
    x0: Tensor,
    noise: Tensor,
    prediction: Prediction = "v",
    mask: Tensor | None = None,
) -> Tensor:
    """Mean squared error between ``pred`` and the training target of its parameterisation.

    ``mask`` (bool or 0/1, broadcastable to ``pred``, e.g. target slots as [B, S, 1, 1, 1, 1])
    restricts the mean to the selected elements: condition slots carry no loss.
    """
    err = (pred - training_target(x0, noise, prediction)).square()
    if mask is None:
        return err.mean()
    weight = mask.to(err.dtype).expand_as(err)
    total = weight.sum()
    if total == 0:
        raise ValueError("flow_matching_loss: the mask selects no elements")
    return (err * weight).sum() / total


# --- samplers -----------------------------------------------------------------------------------


def sample(
    velocity: Velocity,
    noise: Tensor,
    steps: int = 10,
    solver: Solver = "euler",
    shift: float = DEFAULT_SHIFT,
    callback: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    sigmas: Tensor | None = None,
) -> Tensor:
    """Integrate the flow ODE from ``noise`` (s = 1) to data (s = 0) on Wan's schedule.

    ``velocity(x_s, s)`` gets ``s`` as a tensor [B] (same dtype/device as ``x_s``) and returns the
    velocity (convert other parameterisations with :func:`to_velocity`). ``steps = 1`` is the
    preview: ``x0 = noise - v(noise, 1)``. Solvers: ``"euler"`` (first order, one model call per
    step) and ``"dpm++2m"`` (DPM-Solver++ 2M in flow form: second order, also one call per step;
    its last step is first order, as usual for few-step sampling).
    ``sigmas`` (decreasing, ending at 0) replaces Wan's schedule; ``steps`` is then ignored. An
    epsilon-prediction model determines no velocity at s = 1 (``v = (e - x_s) / (1 - s)``): sample
    it from just below 1, e.g. ``sigmas=sampling_sigmas(10).clamp(max=0.999)``.
    Raises :class:`SamplingCancelled` when ``should_cancel()`` is True before a step.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if sigmas is None:
        sigmas = sampling_sigmas(steps, shift)
    sigmas = sigmas.double().tolist()
    steps = len(sigmas) - 1
    if (steps < 1 or not 0.0 < sigmas[0] <= 1.0 or sigmas[-1] != 0.0
            or any(a <= b for a, b in zip(sigmas, sigmas[1:]))):
        raise ValueError(f"sigmas must decrease strictly from <= 1 to 0 (>= 1 step), got {sigmas}")
    x = noise
    previous_x0: Tensor | None = None
    previous_h: float | None = None
    for i in range(steps):
        if should_cancel is not None and should_cancel():
            raise SamplingCancelled(f"sampling cancelled before step {i + 1} of {steps}")
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device))
        if solver == "euler" or s_next == 0.0:
            x = x + (s_next - s) * v
        else:
            x0 = x - s * v
            x, previous_x0, previous_h = _dpmpp_2m_step(x, x0, s, s_next, previous_x0, previous_h)
        if callback is not None:
            callback(i + 1, steps, s_next, x)
    return x


def _lambda(s: float) -> float:
    """Half log-SNR of the flow path: log(alpha / sigma) with alpha = 1 - s, sigma = s."""
    return math.log((1 - s) / s)


def _dpmpp_2m_step(
    x: Tensor,
    x0: Tensor,
    s: float,
    s_next: float,
    previous_x0: Tensor | None,
    previous_h: float | None,
) -> tuple[Tensor, Tensor, float]:
    """One DPM-Solver++(2M) step (Lu et al. 2022, data prediction) with alpha = 1 - s, sigma = s.

    At s = 1 (alpha = 0) lambda is -inf: the step is then the exact first-order jump
    ``x_next = (1 - s_next) * x0 + s_next * x``, the same as the solver's formula in the limit.
    """
    if s >= 1.0:
        return (1 - s_next) * x0 + s_next * x, x0, float("inf")
    h = _lambda(s_next) - _lambda(s)
    expm1 = math.expm1(-h)  # e^{-h} - 1
    if previous_x0 is None or previous_h is None or previous_h == float("inf"):
        d = x0
    else:
        r = previous_h / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
    x_next = (s_next / s) * x - (1 - s_next) * expm1 * d
    return x_next, x0, h
