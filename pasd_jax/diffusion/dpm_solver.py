"""DPM-Solver++ (Lu et al. 2022) multistep, diffusers `DPMSolverMultistepScheduler` semantics, in JAX.

The deterministic `algorithm_type="dpmsolver++"` data-prediction solver (orders 1–3, midpoint or
heun second-order update; "2M" is order 2 / midpoint, the diffusers default). As in `unipc.py`,
every scalar is computed once on the host in float32 with diffusers' operations and stored per
step, and one `step(state, model_output, i)` with a traced `i` runs inside a `lax.scan`:

    m_i = x̂0 (converted model output);  D1₀ = (m_i − m_{i−1})/r₀,  D1₁ = (m_{i−1} − m_{i−2})/r₁
    D1 = D1₀ + q·(D1₀ − D1₁),  D2 = p·(D1₀ − D1₁)
    x_{i+1} = A·x_i − C₀·m_i + k₁·D1 + k₂·D2

with A = σ_t/σ_s, C₀ = α_t(e^{−h} − 1) and (1/r, q, p, k₁, k₂) chosen per step for the order that
step uses (warm-up, `lower_order_final` for N < 15, `euler_at_final`, a final σ = 0 forces order 1);
the unused terms have zero coefficients. Supports use_karras_sigmas, final_sigmas_type zero /
sigma_min, lambda_min_clipped, all three spacings, ε / v / x̂0 prediction. Refused: the SDE and
noise-prediction ("dpmsolver") variants, thresholding, lu/exponential/beta/flow sigmas.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.diffusion import sigmas as S
from pasd_jax.models.configs import UnsupportedConfigError

CLASS_NAME = "DPMSolverMultistepScheduler"

# `DPMSolverMultistepScheduler.__init__` defaults (diffusers 0.42).
DPM_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
    rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
)


class DPMState(NamedTuple):
    """Scan carry: the current sample and the last K converted outputs `[K, …]` (newest last)."""

    sample: jnp.ndarray
    history: jnp.ndarray


def _step_orders(cfg: Mapping[str, Any], n: int) -> list[int]:
    """The order `DPMSolverMultistepScheduler.step` uses at each of the n steps."""
    k, orders = int(cfg["solver_order"]), []
    for i in range(n):
        lower_nums = min(i, k)
        final = i == n - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                                or cfg["final_sigmas_type"] == "zero")
        second = i == n - 2 and cfg["lower_order_final"] and n < 15
        if k == 1 or lower_nums < 1 or final:
            orders.append(1)
        elif k == 2 or lower_nums < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
    return orders


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "sigmas", "alphas_cumprod", "conv", "coef"],
    meta_fields=["solver_order"],
)  # fmt: skip
@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverPP:
    """A DPM-Solver++ schedule for N steps (pytree: tables are leaves, the history size is static).

    timesteps `[N]` int32 (model t), sigmas `[N+1]` float32, alphas_cumprod `[T]`, conv `[N, 3]`
    (cs, co, cd: x̂0 = (cs·x − co·out)/cd), coef `[N, 8]` = (A, C₀, 1/r₀, 1/r₁, q, p, k₁, k₂).
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    alphas_cumprod: np.ndarray
    conv: np.ndarray
    coef: np.ndarray
    solver_order: int
    needs_noise = False

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any], num_steps: int, **overrides: Any) -> DPMSolverPP:
        """Tables of `DPMSolverMultistepScheduler.from_config(cfg)` after `set_timesteps(num_steps)`."""
        cfg = S.merge_config(CLASS_NAME, DPM_DEFAULTS, scheduler_config, overrides)
        S.check_common(CLASS_NAME, cfg)
        S.refuse(CLASS_NAME, cfg, use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
                 use_lu_lambdas=False, use_dynamic_shifting=False, variance_type=None)
        algo = "dpmsolver++" if cfg["algorithm_type"] == "deis" else cfg["algorithm_type"]
        if algo != "dpmsolver++":
            raise UnsupportedConfigError(f"{CLASS_NAME} algorithm_type {algo!r} is not implemented "
                                         "(only the deterministic 'dpmsolver++')")
        solver_type = "midpoint" if cfg["solver_type"] in ("logrho", "bh1", "bh2") else cfg["solver_type"]
        if solver_type not in ("midpoint", "heun"):
            raise UnsupportedConfigError(f"{CLASS_NAME} solver_type {solver_type!r} not in ('midpoint', 'heun')")
        k, n = int(cfg["solver_order"]), int(num_steps)
        if not 1 <= k <= 3 or n < 1:
            raise ValueError(f"{CLASS_NAME}: solver_order must be 1–3 and num_steps ≥ 1, got {k}, {n}")
        ac = S.train_alphas_cumprod(cfg, zero_snr_floor=True)
        ts, sig_all = _timesteps_and_sigmas(cfg, ac, n)
        alpha, sig = S.alpha_sigma(sig_all)
        lam = S.log_snr(alpha, sig)

        f32, one = np.float32, np.float32(1.0)
        coef = np.zeros((n, 8), np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i, order in enumerate(_step_orders(cfg, n)):
                t, s0 = i + 1, i
                h = lam[t] - lam[s0]
                em1 = np.exp(-h) - one  # diffusers: torch.exp(-h) - 1.0 (not expm1)
                A, C0 = sig[t] / sig[s0], alpha[t] * em1
                inv_r0 = inv_r1 = q = p = k1 = k2 = f32(0.0)
                if order >= 2:
                    r0 = (lam[s0] - lam[s0 - 1]) / h
                    inv_r0 = one / r0
                    C1 = alpha[t] * (em1 / h + one)
                    k1 = -(f32(0.5) * C0) if (order == 2 and solver_type == "midpoint") else C1
                if order == 3:
                    r1 = (lam[s0 - 1] - lam[s0 - 2]) / h
                    inv_r1, q, p = one / r1, r0 / (r0 + r1), one / (r0 + r1)
                    k2 = -(alpha[t] * ((np.exp(-h) - one + h) / (h * h) - f32(0.5)))
                coef[i] = (A, C0, inv_r0, inv_r1, q, p, k1, k2)
                if not np.all(np.isfinite(coef[i])):
                    raise UnsupportedConfigError(f"{CLASS_NAME}: step {i} has non-finite coefficients (diffusers "
                                                 "returns NaN/inf there too)")
        conv = S.conversion_coefficients(cfg["prediction_type"], alpha[:n], sig[:n], True)
        return cls(timesteps=ts.astype(np.int32), sigmas=sig_all, alphas_cumprod=ac, conv=conv, coef=coef,
                   solver_order=k)

    def init_state(self, sample: jnp.ndarray) -> DPMState:
        """The carry before step 0 for the start latents `sample`."""
        sample = jnp.asarray(sample, jnp.float32)
        return DPMState(sample, jnp.zeros((self.solver_order,) + sample.shape, jnp.float32))

    def add_noise(self, x: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
        """`DPMSolverMultistepScheduler.add_noise`: σ of t's position in the schedule (last step's if absent)."""
        return S.add_noise_by_sigma(self.sigmas, self.timesteps, x, noise, t)

    def step(self, state: DPMState, model_output: jnp.ndarray, i, noise=None) -> tuple[DPMState, jnp.ndarray]:
        """One `DPMSolverMultistepScheduler.step` at step index `i` (traced int ok) -> (state, next sample)."""
        del noise  # deterministic solver
        row = lambda table: jnp.take(jnp.asarray(table), i, axis=0)
        x = state.sample
        cs, co, cd = row(self.conv)
        m0 = (cs * x - co * model_output.astype(jnp.float32)) / cd
        hist = jnp.concatenate([state.history[1:], m0[None]], axis=0)
        zeros = jnp.zeros_like(x)
        m1 = hist[-2] if self.solver_order >= 2 else zeros
        m2 = hist[-3] if self.solver_order >= 3 else zeros
        A, C0, inv_r0, inv_r1, q, p, k1, k2 = (row(self.coef)[j] for j in range(8))
        d1_0, d1_1 = inv_r0 * (m0 - m1), inv_r1 * (m1 - m2)
        d1, d2 = d1_0 + q * (d1_0 - d1_1), p * (d1_0 - d1_1)
        x_next = A * x - C0 * m0 + k1 * d1 + k2 * d2
        return DPMState(x_next, hist), x_next


def _timesteps_and_sigmas(cfg: Mapping[str, Any], ac: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 timesteps `[n]`, float32 σ `[n+1]`) of `DPMSolverMultistepScheduler.set_timesteps(n)`."""
    T = int(cfg["num_train_timesteps"])
    with np.errstate(divide="ignore"):
        lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
    clipped = int(np.searchsorted(np.flip(lambda_t), np.float32(cfg["lambda_min_clipped"])))
    ts = S.spaced_timesteps(cfg["timestep_spacing"], T, n, int(cfg["steps_offset"]), last_timestep=T - clipped)
    train = S.train_sigmas(ac)
    if cfg["use_karras_sigmas"]:
        log_sigmas = np.log(train)
        sig = S.karras_sigmas(np.flip(train).copy(), n)
        ts = S.sigma_to_t(sig, log_sigmas)
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)
    else:
        sig = np.interp(ts, np.arange(0, len(train)), train)
    last = S.final_sigma(cfg["final_sigmas_type"], S.first_train_sigma(ac))
    return ts, np.concatenate([sig, [last]]).astype(np.float32)
