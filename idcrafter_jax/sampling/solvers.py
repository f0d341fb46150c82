"""Wan's multistep ODE solvers for flow matching: UniPC (bh2) and DPM-Solver++, order 2.

They reproduce diffusers' `UniPCMultistepScheduler` / `DPMSolverMultistepScheduler` as the Wan
pipelines configure them (`prediction_type='flow_prediction'`, `use_flow_sigmas=True`,
`flow_shift=shift`, `solver_order=2`, `lower_order_final=True`, `final_sigmas_type='zero'`;
UniPC `solver_type='bh2'`, DPM `algorithm_type='dpmsolver++'`, `solver_type='midpoint'`).

Both work on the data prediction m = x - sigma v, with alpha = 1 - sigma and
lambda = log(alpha / sigma). Every coefficient depends on the schedule only, so it is computed
here once, on the host, as a (num_steps, K) table; the jitted loop (`sampler.sample_ode`)
applies `step` with one row per step and carries the history (previous sample, previous two
data predictions).

Schedules follow diffusers' `set_timesteps`, which differ from `flow.sigma_schedule` (Euler):
  UniPC: u = linspace(1, 1/1000, N + 1)[:-1], shifted, sigma_0 = 1 - 1e-6, then 0 appended.
  DPM++: u = (1 - linspace(1, 1/1000, N + 1))[::-1][:-1], i.e. from 0.999 down, shifted, then 0.
The network sees int(1000 sigma) (diffusers casts its timesteps to int64, truncating), not 1000 sigma.
"""
from __future__ import annotations

import numpy as np

from idcrafter_jax.sampling import flow

SOLVERS = ("euler", "unipc", "dpm++")

# Columns of a step's coefficients (see `step`).
_COLUMNS = ("sigma", "cx", "cl", "c0", "c1", "c2", "px", "p0", "p1")


def check_solver(solver: str) -> str:
  """`solver` if it is one of `SOLVERS`; a ValueError naming the valid ones otherwise."""
  if solver not in SOLVERS:
    raise ValueError(f"sampling.solver {solver!r} is unknown; expected one of {SOLVERS}.")
  return solver


def schedule(solver: str, num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
  """-> sigmas (num_steps + 1,) float32 ending at 0, and the network's timesteps (num_steps,) float32."""
  check_solver(solver)
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
  if shift <= 0:
    raise ValueError(f"shift must be > 0; got {shift}.")
  n, T = num_steps, flow.NUM_TRAIN_TIMESTEPS
  if solver == "euler":
    sigmas = flow.sigma_schedule(n, shift)
    return sigmas, sigmas[:-1] * np.float32(T)
  if solver == "unipc":
    s = flow.shift_sigmas(np.linspace(1.0, 1.0 / T, n + 1)[:-1], shift)
    if abs(s[0] - 1.0) < 1e-6:
      s[0] -= 1e-6  # diffusers: keeps log(alpha) finite at the first step
  else:
    s = np.flip(flow.shift_sigmas(1.0 - np.linspace(1.0, 1.0 / T, n + 1), shift))[:-1].copy()
  timesteps = (s * T).astype(np.int64).astype(np.float32)
  return np.concatenate([s, [0.0]]).astype(np.float32), timesteps


def _lambdas(sigmas: np.ndarray) -> np.ndarray:
  """log(alpha) - log(sigma) in float32 as diffusers computes it; +inf at sigma = 0."""
  s = sigmas.astype(np.float32)
  with np.errstate(divide="ignore"):
    return np.log(np.float32(1) - s) - np.log(s)


def _unipc_rows(sigmas: np.ndarray) -> np.ndarray:
  """UniPC-p (predictor) and UniC (corrector), B(h) = expm1(-h), order 2 with warm-up and a
  first-order last step (diffusers `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update`)."""
  n = len(sigmas) - 1
  s = sigmas.astype(np.float32)
  lam = _lambdas(s)
  alpha = np.float32(1) - s
  order = [min(2, n - i, i + 1) for i in range(n)]  # lower_order_final and multistep warm-up
  rows = np.zeros((n, len(_COLUMNS)), np.float64)
  for i in range(n):
    r = dict(sigma=s[i], cx=1.0)
    if i > 0:  # corrector of x_i with m_i, at the order of the previous predictor
      h = lam[i] - lam[i - 1]
      hh = -h
      h_phi_1 = np.expm1(hh)
      b_h = h_phi_1
      k = alpha[i] * b_h
      r.update(cx=0.0, cl=s[i] / s[i - 1], c1=-alpha[i] * h_phi_1)
      if order[i - 1] == 1:
        rho_c, rho_d = 0.5, 0.0
        rk = 1.0
      else:
        rk = (lam[i - 2] - lam[i - 1]) / h
        h_phi_k = h_phi_1 / hh - np.float32(1)
        b = [h_phi_k / b_h, (h_phi_k / hh - np.float32(0.5)) * np.float32(2) / b_h]
        rho_d, rho_c = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array(b, np.float64))
      # x_c = x_t_ - k (rho_d (m_{i-2} - m_{i-1}) / rk + rho_c (m_i - m_{i-1}))
      r["c0"] = -k * rho_c
      r["c2"] = -k * rho_d / rk
      r["c1"] += k * rho_d / rk + k * rho_c
    h = lam[i + 1] - lam[i]  # predictor from x_c (sigma_i) to sigma_{i+1}
    h_phi_1 = np.expm1(-h)
    r.update(px=s[i + 1] / s[i], p0=-alpha[i + 1] * h_phi_1)
    if order[i] == 2:  # x_t_ - alpha B_h 0.5 (m_{i-1} - m_i) / rk, B_h = h_phi_1
      rk = (lam[i - 1] - lam[i]) / h
      k = alpha[i + 1] * h_phi_1 * 0.5 / rk
      r["p1"] = -k
      r["p0"] += k
    rows[i] = [r.get(c, 0.0) for c in _COLUMNS]
  return rows


def _dpmpp_rows(sigmas: np.ndarray) -> np.ndarray:
  """DPM-Solver++(2M), midpoint: first order at the first and the last step (diffusers
  `dpm_solver_first_order_update` / `multistep_dpm_solver_second_order_update`)."""
  n = len(sigmas) - 1
  s = sigmas.astype(np.float32)
  lam = _lambdas(s)
  alpha = np.float32(1) - s
  rows = np.zeros((n, len(_COLUMNS)), np.float64)
  for i in range(n):
    h = lam[i + 1] - lam[i]
    e = alpha[i + 1] * (np.exp(-h) - np.float32(1))
    r = dict(sigma=s[i], cx=1.0, px=s[i + 1] / s[i], p0=-e)
    if 0 < i < n - 1:  # D1 = (m_i - m_{i-1}) / r0, r0 = h_0 / h; x -= 0.5 e D1
      r0 = (lam[i] - lam[i - 1]) / h
      r["p0"] -= 0.5 * e / r0
      r["p1"] = 0.5 * e / r0
    rows[i] = [r.get(c, 0.0) for c in _COLUMNS]
  return rows


def coefficients(solver: str, sigmas: np.ndarray) -> np.ndarray:
  """(num_steps, 9) float32 rows for `step`, for the multistep solvers ('unipc', 'dpm++')."""
  if check_solver(solver) == "euler":
    raise ValueError("the 'euler' solver has no multistep coefficients; use flow.ode_step.")
  rows = _unipc_rows(sigmas) if solver == "unipc" else _dpmpp_rows(sigmas)
  if not np.all(np.isfinite(rows)):
    raise ValueError(f"{solver} coefficients are not finite for sigmas {sigmas}.")
  return rows.astype(np.float32)


def step(row, x, v, x_last, m1, m2):
  """One multistep update. x: the current sample, v: the velocity there, x_last: the sample the
  previous predictor started from, m1 / m2: the previous two data predictions.

  m = x - sigma v; corrected x_c = cx x + cl x_last + c0 m + c1 m1 + c2 m2;
  x_next = px x_c + p0 m + p1 m1. Returns (x_next, x_c, m).
  """
  sigma, cx, cl, c0, c1, c2, px, p0, p1 = (row[j] for j in range(len(_COLUMNS)))
  m = x - sigma * v
  x_c = cx * x + cl * x_last + c0 * m + c1 * m1 + c2 * m2
  return px * x_c + p0 * m + p1 * m1, x_c, m
