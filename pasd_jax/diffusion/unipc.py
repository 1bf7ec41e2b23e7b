"""UniPC (Zhao et al. 2023) with diffusers `UniPCMultistepScheduler` semantics, scannable in JAX.

diffusers keeps the multistep state in Python lists and recomputes the solver's scalars every
step; here every scalar a step needs is computed once on the host per (config, N) — in float32,
with the operations diffusers applies to its 0-d tensors — and stored as `[N, …]` tables, so one
`step(state, model_output, i)` with a traced step index `i` serves a whole `lax.scan`. Per step i:

    m_i   = (cs·x_i − co·out_i)/cd                           convert_model_output (x̂0 or ε)
    x_i  ← A·x_{i−1} − B·m_{i−1} − G·(Σ_k ρ_k (m_{i−1−k} − m_{i−1})/r_k + ρ_t (m_i − m_{i−1}))
                                                             UniC corrector (if enabled at i)
    x_{i+1} = A′·x_i − B′·m_i − G′·Σ_k ρ′_k (m_{i−k} − m_i)/r′_k          UniP predictor

with (A, B, G) = (σ_t/σ_s, α_t·hφ₁, α_t·B(h)) for `predict_x0` ((α_t/α_s, σ_t·hφ₁, σ_t·B(h))
otherwise), the orders of the warm-up / `lower_order_final` steps baked into which ρ are non-zero.
Supported: solver_order ≥ 1, bh1/bh2, predict_x0, lower_order_final, disable_corrector,
final_sigmas_type zero/sigma_min, timestep_spacing linspace/leading/trailing, use_karras_sigmas
(+ sigma_min/sigma_max), ε / v / x̂0 prediction, rescale_betas_zero_snr. Refused: thresholding,
exponential/beta/flow sigmas, dynamic shifting, solver_p.
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

CLASS_NAME = "UniPCMultistepScheduler"

# `UniPCMultistepScheduler.__init__` defaults (diffusers 0.42).
UNIPC_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
    solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
    rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None,
    sigma_max=None, shift_terminal=None,
)


class UniPCState(NamedTuple):
    """Scan carry: the sample the model sees next, the predictor's last input, converted outputs `[K, …]`
    (oldest first, newest last, zeros before warm-up)."""

    sample: jnp.ndarray
    last_sample: jnp.ndarray
    history: jnp.ndarray


def _uni_coefficients(lam: np.ndarray, t: int, s0: int, hist: list[int], predict_x0: bool, bh: str,
                      corrector: bool, alpha: np.ndarray, sig: np.ndarray):
    """(A, B, G, ρ of the history terms, r of the history terms, ρ_t) of one UniP/UniC update, float32.

    `t`/`s0` index the target and current σ, `hist` the older σ indices (k = 1 … order−1). Mirrors
    `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` (their `R`, `b`, `rhos`).
    """
    f32, order = np.float32, len(hist) + 1
    h = f32(lam[t] - lam[s0])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rks = [f32((lam[si] - lam[s0]) / h) for si in hist] + [f32(1.0)]
        rks = np.asarray(rks, np.float32)
        hh = -h if predict_x0 else h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - f32(1.0)
        b_h = hh if bh == "bh1" else np.expm1(hh)
        rows, b, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(rks ** (i - 1))
            b.append(h_phi_k * f32(factorial) / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - f32(1.0 / factorial)
        R, b = np.stack(rows).astype(np.float32), np.asarray(b, np.float32)
        if corrector:
            rhos = np.asarray([0.5], np.float32) if order == 1 else np.linalg.solve(R, b).astype(np.float32)
            rho_hist, rho_t = rhos[:-1], rhos[-1]
        else:
            if order == 1:
                rho_hist = np.zeros(0, np.float32)
            elif order == 2:
                rho_hist = np.asarray([0.5], np.float32)
            else:
                rho_hist = np.linalg.solve(R[:-1, :-1], b[:-1]).astype(np.float32)
            rho_t = f32(0.0)
        if predict_x0:
            A, B, G = sig[t] / sig[s0], alpha[t] * h_phi_1, alpha[t] * b_h
        else:
            A, B, G = alpha[t] / alpha[s0], sig[t] * h_phi_1, sig[t] * b_h
    return f32(A), f32(B), f32(G), rho_hist, rks[:-1], f32(rho_t)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "sigmas", "alphas_cumprod", "conv", "use_corrector", "corr", "corr_rho", "corr_rk",
                 "pred", "pred_rho", "pred_rk"],
    meta_fields=["solver_order"],
)  # fmt: skip
@dataclasses.dataclass(frozen=True, eq=False)
class UniPC:
    """A UniPC schedule for N steps: per-step float32 tables (pytree leaves) and the history size.

    timesteps `[N]` int32: the model's t at each step. sigmas `[N+1]` float32: diffusers' `sigmas`.
    alphas_cumprod `[T]`: the train ᾱ (for the ANS start). conv `[N, 3]`: (cs, co, cd).
    use_corrector `[N]` bool. corr / pred `[N, 3]`: (A, B, G). corr_rho `[N, K]` (history ρ, then ρ_t),
    corr_rk `[N, K−1]`, pred_rho / pred_rk `[N, K−1]`; unused slots hold ρ = 0, r = 1.
    Build with `UniPC.from_config(scheduler_config, num_steps, **overrides)`.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    alphas_cumprod: np.ndarray
    conv: np.ndarray
    use_corrector: np.ndarray
    corr: np.ndarray
    corr_rho: np.ndarray
    corr_rk: np.ndarray
    pred: np.ndarray
    pred_rho: np.ndarray
    pred_rk: np.ndarray
    solver_order: int
    needs_noise = False

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any], num_steps: int, **overrides: Any) -> UniPC:
        """Tables of `UniPCMultistepScheduler.from_config(cfg)` after `set_timesteps(num_steps)`."""
        cfg = S.merge_config(CLASS_NAME, UNIPC_DEFAULTS, scheduler_config, overrides)
        S.check_common(CLASS_NAME, cfg)
        S.refuse(CLASS_NAME, cfg, use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
                 use_dynamic_shifting=False, solver_p=None, shift_terminal=None)
        solver_type = cfg["solver_type"]
        if solver_type in ("midpoint", "heun", "logrho"):
            solver_type = "bh2"  # diffusers re-registers these as bh2
        if solver_type not in ("bh1", "bh2"):
            raise UnsupportedConfigError(f"{CLASS_NAME} solver_type {solver_type!r} not in ('bh1', 'bh2')")
        order, n = int(cfg["solver_order"]), int(num_steps)
        if order < 1 or n < 1:
            raise ValueError(f"{CLASS_NAME}: solver_order and num_steps must be ≥ 1, got {order}, {n}")
        ac = S.train_alphas_cumprod(cfg, zero_snr_floor=True)
        ts, sig_all = _timesteps_and_sigmas(cfg, ac, n)
        alpha, sig = S.alpha_sigma(sig_all)
        lam = S.log_snr(alpha, sig)
        predict_x0 = bool(cfg["predict_x0"])
        disabled = {int(k) for k in (cfg["disable_corrector"] or [])}

        k_hist = order - 1
        corr, pred = np.zeros((n, 3), np.float32), np.zeros((n, 3), np.float32)
        corr_rho, corr_rk = np.zeros((n, order), np.float32), np.ones((n, k_hist), np.float32)
        pred_rho, pred_rk = np.zeros((n, k_hist), np.float32), np.ones((n, k_hist), np.float32)
        use_corr = np.zeros(n, bool)
        prev_order = None
        for i in range(n):
            this_order = min(order, n - i) if cfg["lower_order_final"] else order
            this_order = min(this_order, min(i, order) + 1)  # warm-up
            if i > 0 and (i - 1) not in disabled:
                use_corr[i] = True
                hist = [i - 1 - k for k in range(1, prev_order)]
                A, B, G, rho_h, rk, rho_t = _uni_coefficients(lam, i, i - 1, hist, predict_x0, solver_type, True,
                                                              alpha, sig)
                corr[i] = (A, B, G)
                corr_rho[i, :len(hist)], corr_rk[i, :len(hist)], corr_rho[i, -1] = rho_h, rk, rho_t
                _check_finite(i, "corrector", corr[i], corr_rho[i], corr_rk[i])
            hist = [i - k for k in range(1, this_order)]
            A, B, G, rho_h, rk, _ = _uni_coefficients(lam, i + 1, i, hist, predict_x0, solver_type, False, alpha, sig)
            pred[i] = (A, B, G)
            pred_rho[i, :len(hist)], pred_rk[i, :len(hist)] = rho_h, rk
            _check_finite(i, "predictor", pred[i], pred_rho[i], pred_rk[i])
            prev_order = this_order
        conv = S.conversion_coefficients(cfg["prediction_type"], alpha[:n], sig[:n], predict_x0)
        return cls(timesteps=ts.astype(np.int32), sigmas=sig_all, alphas_cumprod=ac,
                   conv=conv, use_corrector=use_corr, corr=corr, corr_rho=corr_rho, corr_rk=corr_rk, pred=pred,
                   pred_rho=pred_rho, pred_rk=pred_rk, solver_order=order)

    def init_state(self, sample: jnp.ndarray) -> UniPCState:
        """The carry before step 0 for the start latents `sample` (any shape, float32)."""
        sample = jnp.asarray(sample, jnp.float32)
        zeros = jnp.zeros_like(sample)
        return UniPCState(sample, zeros, jnp.zeros((self.solver_order,) + sample.shape, jnp.float32))

    def add_noise(self, x: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
        """`UniPCMultistepScheduler.add_noise` (diffusers ≥ 0.25): σ of t's position in the schedule,
        the last step's σ for a t outside it (PASD_REFERENCE §7.4)."""
        return S.add_noise_by_sigma(self.sigmas, self.timesteps, x, noise, t)

    def step(self, state: UniPCState, model_output: jnp.ndarray, i, noise=None) -> tuple[UniPCState, jnp.ndarray]:
        """One `UniPCMultistepScheduler.step` at step index `i` (traced int ok) -> (state, next sample)."""
        del noise  # deterministic solver
        row = lambda table: jnp.take(jnp.asarray(table), i, axis=0)
        x, hist = state.sample, state.history
        cs, co, cd = row(self.conv)
        m_t = (cs * x - co * model_output.astype(jnp.float32)) / cd

        A, B, G = row(self.corr)
        rho, rk = row(self.corr_rho), row(self.corr_rk)
        m0, res = hist[-1], 0.0
        for k in range(1, self.solver_order):
            res = res + rho[k - 1] * ((hist[-(k + 1)] - m0) / rk[k - 1])
        corrected = A * state.last_sample - B * m0 - G * (res + rho[-1] * (m_t - m0))
        x = jnp.where(row(self.use_corrector), corrected, x)

        hist = jnp.concatenate([hist[1:], m_t[None]], axis=0)
        A, B, G = row(self.pred)
        rho, rk = row(self.pred_rho), row(self.pred_rk)
        res = jnp.zeros_like(x)
        for k in range(1, self.solver_order):
            res = res + rho[k - 1] * ((hist[-(k + 1)] - m_t) / rk[k - 1])
        x_next = A * x - B * m_t - G * res
        return UniPCState(x_next, x, hist), x_next


def _check_finite(i: int, what: str, abg, rho, rk) -> None:
    """Refuse a step whose coefficients are non-finite or divide by r = 0 (h = ∞ with older outputs)."""
    if not (np.all(np.isfinite(abg)) and np.all(np.isfinite(rho)) and np.all(np.isfinite(rk)) and np.all(rk != 0)):
        raise UnsupportedConfigError(
            f"{CLASS_NAME}: the {what} of step {i} has non-finite coefficients (diffusers returns NaN/inf "
            "there too); with final_sigmas_type='zero' use solver_type='bh2', predict_x0=True and "
            "lower_order_final=True, or final_sigmas_type='sigma_min'")


def _timesteps_and_sigmas(cfg: Mapping[str, Any], ac: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 timesteps `[n]`, float32 σ `[n+1]`) of `UniPCMultistepScheduler.set_timesteps(n)`."""
    train = S.train_sigmas(ac)
    T = int(cfg["num_train_timesteps"])
    ts = S.spaced_timesteps(cfg["timestep_spacing"], T, n, int(cfg["steps_offset"]))
    if cfg["use_karras_sigmas"]:
        log_sigmas = np.log(train)
        sig = S.karras_sigmas(np.flip(train).copy(), n, cfg["sigma_min"], cfg["sigma_max"])
        ts = np.round(S.sigma_to_t(sig, log_sigmas)).astype(np.int64)
        last = S.final_sigma(cfg["final_sigmas_type"], sig[-1])
    else:
        sig = np.interp(ts, np.arange(0, len(train)), train)
        last = S.final_sigma(cfg["final_sigmas_type"], S.first_train_sigma(ac))
    return ts, np.concatenate([sig, [last]]).astype(np.float32)
