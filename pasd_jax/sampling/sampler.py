"""The compiled PASD sampler: LQ latent + ANS init, a scanned scheduler with CFG and tiling, VAE decode.

Mirrors `PASDPipeline.__call__` of the reference (PASD_REFERENCE §7.3–7.6); DDIM by default, or any
scheduler of `pasd_jax.diffusion.schedulers` (UniPC, DPM-Solver++, LCM), whose multistep state is
the scan carry:

    z0      = 0.18215 · (mean + std · ε1)                       VAE posterior sample of 2·lq − 1
    latents = sqrt(ᾱ_a ᾱ_t0) z0 + sqrt(ᾱ_a (1 − ᾱ_t0)) ε2 + sqrt(1 − ᾱ_a) ε3      (ANS, §7.4)
    f       = DR-net feature of lq                               (once: it depends on lq alone)
    for i, t in enumerate(timesteps):                            (one `lax.scan`)
        x_in = [latents; latents]; text = [negative; positive]
        down, mid = controlnet(x_in, t, text, [f; f], conditioning_scale)
        ε_u, ε_c = unet(x_in, t, text, down, mid)
        state, latents = scheduler.step(state, ε_u + g (ε_c − ε_u), i)
    image = clip(vae.decode(latents / 0.18215) / 2 + 0.5, 0, 1)

`Sampler.__call__` runs all of it inside one `jax.jit`; it is traced once per (image shape, number
of steps, settings) and reused for every image of that size (`trace_count` counts traces).
`Sampler.run_loop` is the plain-Python twin for debugging: the same `denoise_step`, one jitted
call per step. Latents whose `h·w` exceeds `tile_size²` are split into overlapping tiles whose
noise predictions are blended with Gaussian weights (§7.5); the tiles of one step are batched
(`tiles_per_call`).

Batches and devices: the local devices form a ("data", "tiles") mesh chosen per batch size B:
`data = gcd(B, n_devices)` devices each take whole images (B/data of them), the remaining factor
splits a large image's tiles. With guidance the network batch is interleaved per image
([u0, c0, u1, c1, …]) so that an image's two CFG branches stay on one device. Each image has its
own noises (`Noises.stack` of per-image draws, per-image step keys), so an image's result depends
only on its inputs and seed, never on B, its position or the device count (up to float
reassociation: ~1e-5 relative in the latents).

Shapes: lq [B, H, W, 3] float32 in [0, 1] (H, W multiples of 8), text [2B or B, L, D] (negatives
first: [neg_0 … neg_B−1; pos_0 … pos_B−1]), latents [B, H/8, W/8, 4]. All scheduler maths and
latents are float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pasd_jax.diffusion.schedulers import DDIM, make_scheduler
from pasd_jax.imaging import tiling
from pasd_jax.sampling import progress
from pasd_jax.sampling import defaults, tiled_vae


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Static sampler options (part of the compilation key). Defaults: the paper's recipe
    (`pasd_jax.sampling.defaults`).

    num_steps: scheduler steps. eta: DDIM η (0 = deterministic).
    scheduler: "ddim", "unipc", "dpmpp_2m" or "lcm" (`pasd_jax.diffusion.schedulers`); its config
      (betas, spacing, …) is the models' `scheduler_config`.
    ans_compat: "closed_form" (ᾱ looked up at t0 and at the level, §7.4) or "reference": the two
      `add_noise` calls of the scheduler itself, as `test_pasd.py` with diffusers ≥ 0.25 does (UniPC /
      DPM-Solver: a level outside the schedule falls back to the last step's σ).
    guidance: run classifier-free guidance (batch [negative; positive]); the pipeline turns it off
      for guidance_scale ≤ 1, which halves the work.
    init: "ans" (LQ latent + adjustable noise, §7.4) or "noise" (pure Gaussian start).
    latent_tiling: tile big latents at all (False: never, e.g. training validation).
    tile_size, tile_overlap: latent tiling (latent px); tiling is on when h·w > tile_size².
    tiles_per_call: tiles per network call (rounded up to a multiple of the local device count).
    vae_tiling: "auto" (above the reference's thresholds), "always" or "never".
    vae_encoder_tile, vae_encoder_pad: image px; vae_decoder_tile, vae_decoder_pad: latent px.
    trajectory: also return every step's latents (for parity tests; costs memory).
    progress: call `pasd_jax.sampling.progress.emit(step)` on the host after every scan step (per-step
      progress bars and ETA without recompiling; off by default and in benchmarks).
    """

    num_steps: int = defaults.STEPS
    eta: float = defaults.ETA
    guidance: bool = True
    init: str = defaults.INIT
    latent_tiling: bool = True
    tile_size: int = defaults.TILE_SIZE
    tile_overlap: int = defaults.TILE_OVERLAP
    tiles_per_call: int = defaults.TILES_PER_CALL
    vae_tiling: str = defaults.VAE_TILING
    vae_encoder_tile: int = defaults.ENCODER_TILE
    vae_encoder_pad: int = defaults.ENCODER_PAD
    vae_decoder_tile: int = defaults.DECODER_TILE
    vae_decoder_pad: int = defaults.DECODER_PAD
    trajectory: bool = False
    scheduler: str = defaults.SCHEDULER
    ans_compat: str = defaults.ANS_COMPAT
    progress: bool = False

    def __post_init__(self):
        if self.ans_compat not in defaults.ANS_COMPATS:
            raise ValueError(f"ans_compat must be one of {defaults.ANS_COMPATS}, got {self.ans_compat!r}")
        if self.scheduler not in defaults.SCHEDULERS:
            raise ValueError(f"scheduler must be one of {defaults.SCHEDULERS}, got {self.scheduler!r}")
        if self.init not in defaults.INITS:
            raise ValueError(f"init must be 'ans' or 'noise', got {self.init!r}")
        if self.vae_tiling not in defaults.VAE_TILINGS:
            raise ValueError(f"vae_tiling must be 'auto', 'always' or 'never', got {self.vae_tiling!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {self.num_steps}")
        if self.tile_size < 1 or self.tile_overlap < 0 or self.tiles_per_call < 1:
            raise ValueError("tile_size and tiles_per_call must be positive, tile_overlap non-negative")


class Noises(NamedTuple):
    """The Gaussian draws of one sampling run, in the reference's order (each [B, h, w, C]).

    vae_posterior: ε1 of the VAE posterior sample; first_timestep: ε2 (noise to t0, or the whole
    start latent with init="noise"); added_noise_level: ε3 (ANS); step_key: key of the per-step noise
    (DDIM η > 0, LCM), folded with the step index: one key for the whole batch, or [B] keys (one per
    image, from `stack`), each drawing its image's [h, w, C] noise.
    """

    vae_posterior: jnp.ndarray
    first_timestep: jnp.ndarray
    added_noise_level: jnp.ndarray
    step_key: jnp.ndarray

    @classmethod
    def draw(cls, key: jax.Array, latent_shape: tuple) -> Noises:
        """Draw all noises of a run from one key (deterministic for a given key and shape)."""
        k1, k2, k3, k4 = jax.random.split(key, 4)
        normal = lambda k: jax.random.normal(k, latent_shape, jnp.float32)
        return cls(normal(k1), normal(k2), normal(k3), k4)

    @classmethod
    def stack(cls, draws: list) -> Noises:
        """One batch from per-image draws (each `draw(key_i, [1, h, w, C])`): arrays concatenated
        on the batch axis, step keys stacked to [B]. Image i then gets exactly the noises it gets
        alone, whatever the batch."""
        keys = [d.step_key.reshape(()) if d.step_key.ndim else d.step_key for d in draws]
        return cls(*(jnp.concatenate([getattr(d, f) for d in draws]) for f in cls._fields[:3]), jnp.stack(keys))

    def step_noise(self, step_index, shape: tuple) -> jnp.ndarray:
        """The per-step noise of `shape` [B, h, w, C] at `step_index`."""
        if self.step_key.ndim == 0:
            return jax.random.normal(jax.random.fold_in(self.step_key, step_index), shape)
        one = lambda k: jax.random.normal(jax.random.fold_in(k, step_index), shape[1:])
        return jax.vmap(one)(self.step_key)


class SampleInputs(NamedTuple):
    """Traced per-run values: changing them never recompiles."""

    lq: jnp.ndarray                 # [B, H, W, 3] in [0, 1]
    text: jnp.ndarray               # [2B, L, D] = [negative; positive] with guidance, else [B, L, D]
    noises: Noises
    guidance_scale: jnp.ndarray     # scalar float32
    conditioning_scale: jnp.ndarray  # scalar float32
    added_noise_level: jnp.ndarray  # scalar int32 (≤ 0: ANS off)
    #: DR-net features of `lq`, set by the sampler once per run (`Sampler.condition`): [B, h, w, C0],
    #: or [groups, tiles per call, B, T, T, C0] when the latent is tiled. None from `make_inputs`.
    cond_feature: Optional[jnp.ndarray] = None


def ans_init(schedule, z0, eps_t0, eps_added, t0, added_noise_level):
    """Adjustable-noise start latent in closed form (§7.4), ᾱ looked up explicitly in
    `schedule.alphas_cumprod` (any scheduler, a `DDIMArrays` or a `NoiseSchedule`).

    `sqrt(ᾱ_a ᾱ_t0) z0 + sqrt(ᾱ_a (1 − ᾱ_t0)) ε2 + sqrt(1 − ᾱ_a) ε3`; equals
    `add_noise(add_noise(z0, ε2, t0), ε3, a)`. A level a ≤ 0 switches ANS off (ᾱ_a = 1: plain
    `add_noise(z0, ε2, t0)`).
    """
    ac = schedule.alphas_cumprod
    ab_t0 = jnp.take(ac, t0)
    a = jnp.asarray(added_noise_level, jnp.int32)
    ab_a = jnp.where(a > 0, jnp.take(ac, jnp.clip(a, 0, ac.shape[0] - 1)), jnp.float32(1.0))
    return (jnp.sqrt(ab_a * ab_t0) * z0 + jnp.sqrt(ab_a * (1 - ab_t0)) * eps_t0
            + jnp.sqrt(1 - ab_a) * eps_added)


def ans_init_reference(scheduler, z0, eps_t0, eps_added, t0, added_noise_level):
    """The reference's ANS start verbatim: `add_noise(add_noise(z0, ε2, t0), ε3, a)` with the
    scheduler's own `add_noise` (§7.4; with UniPC / DPM-Solver a level not in the schedule uses the
    last step's σ, as diffusers ≥ 0.25 does). A level a ≤ 0 skips the second call."""
    x = scheduler.add_noise(z0, eps_t0, t0)
    a = jnp.asarray(added_noise_level, jnp.int32)
    return jnp.where(a > 0, scheduler.add_noise(x, eps_added, a), x)


class Sampler:
    """PASD sampling for one `PASDBundle` and one `SamplerSettings` (see the module docstring).

    The bundle gives the networks and the schedule; its params (if any) are the default weights
    of `__call__` / `run_loop`."""

    def __init__(self, models, settings: SamplerSettings = SamplerSettings(), timesteps=None, scheduler=None,
                 shard: bool = True):
        """`timesteps` (descending ints) replaces the schedule's `settings.num_steps` DDIM timesteps
        (e.g. a golden test's); the DDIM step then goes from t to t − T // len(timesteps).
        `scheduler` (a built `pasd_jax.diffusion.schedulers` object) replaces the one `settings` names.
        `shard=False` keeps the sampler off the local-device mesh (for a caller that traces it inside
        its own jit over its own mesh, e.g. training validation)."""
        self.models = models
        self.schedule = models.schedule
        if scheduler is None:
            scheduler = self._build_scheduler(models, settings, timesteps)
        elif timesteps is not None:
            raise ValueError("pass either `timesteps` or a built `scheduler`, not both")
        self.scheduler = scheduler
        settings = dataclasses.replace(settings, num_steps=scheduler.num_steps)
        self.settings = settings
        self.timesteps = jnp.asarray(scheduler.timesteps)
        self.trace_count = 0
        self._sample = jax.jit(self._sample_impl)
        self._step = jax.jit(self.denoise_step)
        self._devices = jax.local_devices() if shard else []
        self._mesh = None        # the mesh of the batch being traced (set in `_sample_impl`)
        self._replicated = {}    # mesh shape -> (params id, params replicated over that mesh)

    def mesh_for(self, batch: int) -> Optional[Mesh]:
        """The ("data", "tiles") mesh over the local devices for a batch of `batch` images:
        data = gcd(batch, devices) (whole images per device), tiles = the rest; None on one device."""
        n = len(self._devices)
        if n <= 1:
            return None
        data = math.gcd(batch, n)
        return Mesh(np.array(self._devices).reshape(data, n // data), ("data", "tiles"))

    def _constrain(self, x, *spec):
        """`with_sharding_constraint` to `spec` on the current mesh (no-op on one device)."""
        if self._mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self._mesh, PartitionSpec(*spec)))

    def place(self, inputs: SampleInputs, params: dict):
        """(inputs, params) on the mesh of this batch: image-axis arrays split over "data"; text,
        scalars and params replicated (the params once per params object and mesh)."""
        b = inputs.lq.shape[0]
        mesh = self.mesh_for(b)
        if mesh is None:
            return inputs, params
        shard = NamedSharding(mesh, PartitionSpec("data"))
        rep = NamedSharding(mesh, PartitionSpec())
        key = mesh.devices.shape
        cached = self._replicated.get(key)
        if cached is None or cached[0] is not params:
            cached = (params, jax.device_put(params, rep))
            self._replicated = {key: cached}  # one replica set at a time (the weights may be large)
        nz = inputs.noises
        noises = Noises(*(jax.device_put(a, shard) for a in nz[:3]),
                        jax.device_put(nz.step_key, shard if nz.step_key.ndim else rep))
        placed = inputs._replace(lq=jax.device_put(inputs.lq, shard), text=jax.device_put(inputs.text, rep),
                                 noises=noises,
                                 guidance_scale=jax.device_put(inputs.guidance_scale, rep),
                                 conditioning_scale=jax.device_put(inputs.conditioning_scale, rep),
                                 added_noise_level=jax.device_put(inputs.added_noise_level, rep))
        return placed, cached[1]

    @staticmethod
    def _build_scheduler(models, settings: SamplerSettings, timesteps):
        """DDIM from the models' `NoiseSchedule` (optionally over explicit `timesteps`), else
        `make_scheduler(settings.scheduler, models.scheduler_config, num_steps)`."""
        if settings.scheduler == "ddim":
            return DDIM.from_schedule(models.schedule, settings.num_steps, timesteps=timesteps, eta=settings.eta)
        if timesteps is not None:
            raise ValueError(f"explicit timesteps are only supported with DDIM, not {settings.scheduler}")
        config = getattr(models, "scheduler_config", None)
        if config is None:
            raise ValueError(f"scheduler {settings.scheduler!r} needs the models' scheduler_config")
        return make_scheduler(settings.scheduler, config, settings.num_steps, eta=settings.eta)

    # ---- networks -----------------------------------------------------------------------------
    def _eps(self, params, x, t, text, feature, cond_scale):
        """ControlNet (on the DR-net `feature`) + PASD UNet on a batch: x [N, h, w, 4],
        feature [N, h, w, C0] -> ε [N, h, w, 4]."""
        m = self.models
        tb = jnp.broadcast_to(t, (x.shape[0],))
        _, down, mid = m.controlnet.apply({"params": params["controlnet"]}, x, tb, text, None,
                                          conditioning_scale=cond_scale, cond_feature=feature)
        eps = m.unet.apply({"params": params["unet"]}, x, tb, text, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid)
        return eps.astype(jnp.float32)

    def _tiled(self, h: int, w: int) -> bool:
        return self.settings.latent_tiling and tiling.needs_tiling(h, w, self.settings.tile_size)

    def _tile_layout(self, h: int, w: int):
        """(tile side, origins, tiles per call, groups) of an h×w latent; the last group is padded
        by repeating the last tile (its prediction is dropped)."""
        s = self.settings
        tile = tiling.effective_tile(h, w, s.tile_size)
        origins = tiling.tile_origins(h, w, s.tile_size, s.tile_overlap)
        per_call = min(s.tiles_per_call, len(origins))
        if self._mesh is not None:  # whole tiles per device
            per_call = math.ceil(per_call / self._mesh.shape["tiles"]) * self._mesh.shape["tiles"]
        return tile, origins, per_call, math.ceil(len(origins) / per_call)

    def _tile_stack(self, a, h: int, w: int, scale: int = 1):
        """Crops of every latent tile of `a` [n, scale·h, scale·w, C] (`scale` = 8 for the LQ
        image), grouped per network call: [groups, tiles per call, n, scale·T, scale·T, C]."""
        tile, origins, per_call, groups = self._tile_layout(h, w)
        crops = jnp.stack([a[:, scale * y:scale * (y + tile), scale * x0:scale * (x0 + tile)] for y, x0 in origins])
        pad = groups * per_call - len(origins)
        if pad:
            crops = jnp.concatenate([crops, jnp.repeat(crops[-1:], pad, 0)])
        return crops.reshape((groups, per_call) + crops.shape[1:])

    def condition(self, params, lq):
        """DR-net features of the LQ images, computed once per run: they depend on the image alone
        (not on the latent, timestep, prompt or CFG branch), so the 2·steps network calls of an
        image share one. lq [B, H, W, 3] -> [B, h, w, C0], or per tile as `_tile_stack` (the DR net
        runs on each tile's own crop of the LQ image, as the reference's per-tile ControlNet does)."""
        m = self.models
        embed = lambda c: m.controlnet.apply({"params": params["controlnet"]}, c,
                                             method=m.controlnet.embed_condition)
        d = m.latent_downscale
        h, w = lq.shape[1] // d, lq.shape[2] // d
        if not self._tiled(h, w):
            return self._constrain(embed(lq), "data")

        def run(chunk):  # [k, B, 8T, 8T, 3] -> [k, B, T, T, C0]
            chunk = self._constrain(chunk, "tiles", "data")
            f = embed(chunk.reshape((-1,) + chunk.shape[2:]))
            return self._constrain(f.reshape(chunk.shape[:2] + f.shape[1:]), "tiles", "data")

        return jax.lax.map(run, self._tile_stack(lq, h, w, scale=d))

    def _tiled_eps(self, params, x, t, text, features, cond_scale):
        """`_eps` over overlapping latent tiles blended with Gaussian weights (§7.5); `features`
        are the tiles' DR-net features [groups, tiles per call, N, T, T, C0]."""
        n, h, w, c = x.shape
        tile, origins, per_call, groups = self._tile_layout(h, w)
        weights = tiling.gaussian_weights(tile, tile)
        norm = np.zeros((h, w), np.float64)
        for y, x0 in origins:
            norm[y:y + tile, x0:x0 + tile] += weights
        text_k = jnp.tile(text, (per_call, 1, 1))

        def run(chunk):
            cx, cf = chunk  # [k, n, T, T, 4], [k, n, T, T, C0]: tiles over "tiles", images over "data"
            cx, cf = self._constrain(cx, "tiles", "data"), self._constrain(cf, "tiles", "data")
            eps = self._eps(params, cx.reshape((-1,) + cx.shape[2:]), t, text_k, cf.reshape((-1,) + cf.shape[2:]),
                            cond_scale)
            return eps.reshape(cx.shape)

        eps_tiles = jax.lax.map(run, (self._tile_stack(x, h, w), features)).reshape((-1, n, tile, tile, c))
        acc = jnp.zeros((n, h, w, c), jnp.float32)
        w4 = jnp.asarray(weights)[None, :, :, None]
        for i, (y, x0) in enumerate(origins):
            acc = acc.at[:, y:y + tile, x0:x0 + tile].add(eps_tiles[i] * w4)
        return acc / jnp.asarray(norm, jnp.float32)[None, :, :, None]

    def guided_eps(self, params, latents, t, inputs: SampleInputs):
        """ControlNet + UNet noise prediction at t with CFG (and latent tiling when large).
        `inputs.cond_feature` holds the DR-net features (computed here when it is None)."""
        s = self.settings
        h, w = latents.shape[1:3]
        tiled = self._tiled(h, w)
        feat = inputs.cond_feature if inputs.cond_feature is not None else self.condition(params, inputs.lq)
        x_in, text = latents, inputs.text
        if s.guidance:  # [u0, c0, u1, c1, …]: each image's two branches side by side (one device)
            x_in, text = jnp.repeat(latents, 2, 0), interleave_cfg(text)
            feat = jnp.repeat(feat, 2, 2 if tiled else 0)
        x_in, text = self._constrain(x_in, "data"), self._constrain(text, "data")
        if tiled:
            eps = self._tiled_eps(params, x_in, t, text, feat, inputs.conditioning_scale)
        else:
            eps = self._eps(params, x_in, t, text, self._constrain(feat, "data"), inputs.conditioning_scale)
        if s.guidance:
            eps = eps.reshape((latents.shape[0], 2) + eps.shape[1:])
            eps_u, eps_c = eps[:, 0], eps[:, 1]
            eps = eps_u + inputs.guidance_scale * (eps_c - eps_u)
        return self._constrain(eps, "data")

    def denoise_step(self, params, state, inputs: SampleInputs, step_index):
        """One guided scheduler step at `step_index` (traced int32): state -> (state, latents).

        Shared by the scan and the loop twin; `state.sample` is what the networks see."""
        sched = self.scheduler
        latents = state.sample
        eps = self.guided_eps(params, latents, jnp.take(self.timesteps, step_index), inputs)
        noise = None
        if sched.needs_noise:
            noise = self._constrain(inputs.noises.step_noise(step_index, latents.shape), "data")
        return sched.step(state, eps, step_index, noise)

    # ---- VAE ------------------------------------------------------------------------------------
    def _use_vae_tiling(self, needed: bool) -> bool:
        """`needed` (the reference's rule, `tiled_vae.needs_tiled_encode/decode`, §7.6) unless the
        settings force tiling on ("always") or off ("never")."""
        return {"always": True, "never": False}.get(self.settings.vae_tiling, needed)

    def encode(self, params, lq, eps1):
        """z0 = scaling · (mean + std·ε1) of the VAE posterior of `2·lq − 1` (tiled when large)."""
        vae, s = self.models.vae, self.settings
        x = 2.0 * lq - 1.0
        h, w = x.shape[1:3]
        if self._use_vae_tiling(tiled_vae.needs_tiled_encode(h, w, s.vae_encoder_tile, s.vae_encoder_pad)):
            mean, logvar = tiled_vae.tiled_encode(vae, params["vae"], x, tile=s.vae_encoder_tile,
                                                  pad=s.vae_encoder_pad)
        else:
            mean, logvar = vae.apply({"params": params["vae"]}, x, method=vae.encode)
        return self.models.scaling_factor * (mean + jnp.exp(0.5 * logvar) * eps1)

    def decode(self, params, latents):
        """Raw VAE decoder output of `latents / scaling` (tiled when large), float32 [B, H, W, 3]."""
        vae, s = self.models.vae, self.settings
        z = latents / self.models.scaling_factor
        h, w = z.shape[1:3]
        if self._use_vae_tiling(tiled_vae.needs_tiled_decode(h, w, s.vae_decoder_tile, s.vae_decoder_pad)):
            return tiled_vae.tiled_decode(vae, params["vae"], z, tile=s.vae_decoder_tile, pad=s.vae_decoder_pad)
        return vae.apply({"params": params["vae"]}, z, method=vae.decode)

    def init_latents(self, params, inputs: SampleInputs):
        """(z0 or None, start latents) for the settings' init mode."""
        nz = inputs.noises
        if self.settings.init == "noise":
            return None, nz.first_timestep
        z0 = self.encode(params, inputs.lq, nz.vae_posterior)
        if self.settings.ans_compat == "reference":
            return z0, ans_init_reference(self.scheduler, z0, nz.first_timestep, nz.added_noise_level,
                                          self.timesteps[0], inputs.added_noise_level)
        return z0, ans_init(self.scheduler, z0, nz.first_timestep, nz.added_noise_level, self.timesteps[0],
                            inputs.added_noise_level)

    # ---- whole runs -----------------------------------------------------------------------------
    def _sample_impl(self, params, inputs: SampleInputs) -> dict:
        self.trace_count += 1  # Python side effect: runs once per trace (= per compilation)
        self._mesh = self.mesh_for(inputs.lq.shape[0])
        try:
            return self._sample_traced(params, inputs)
        finally:
            self._mesh = None

    def _sample_traced(self, params, inputs: SampleInputs) -> dict:
        inputs = inputs._replace(lq=self._constrain(inputs.lq, "data"))
        inputs = inputs._replace(cond_feature=self.condition(params, inputs.lq))
        z0, latents = self.init_latents(params, inputs)
        latents = self._constrain(latents, "data")

        def body(state, i):
            state, lat = self.denoise_step(params, state, inputs, i)
            if self.settings.progress:
                jax.debug.callback(progress.emit, i)
            return state, (lat if self.settings.trajectory else None)

        steps = jnp.arange(self.settings.num_steps, dtype=jnp.int32)
        state, traj = jax.lax.scan(body, self.scheduler.init_state(latents), steps)
        final = state.sample
        decoded = self._constrain(self.decode(params, final), "data")
        out = {"init_latents": latents, "final_latents": final, "decoded": decoded,
               "image": jnp.clip(decoded / 2 + 0.5, 0.0, 1.0)}
        if z0 is not None:
            out["vae_latent_z0"] = z0
        if traj is not None:
            out["trajectory"] = traj
        return out

    def __call__(self, inputs: SampleInputs, params: Optional[dict] = None) -> dict:
        """Run the compiled sampler. Returns {"image" [B, H, W, 3] in [0, 1], "decoded",
        "init_latents", "final_latents", "vae_latent_z0" (ANS), "trajectory" [N, B, h, w, 4] (opt.)}."""
        inputs, params = self.place(inputs, self.models.params if params is None else params)
        return self._sample(params, inputs)

    def run_loop(self, inputs: SampleInputs, params: Optional[dict] = None) -> dict:
        """The same computation as `__call__` as a Python loop (one jitted call per step)."""
        params = self.models.params if params is None else params
        z0, latents = jax.jit(self.init_latents)(params, inputs)
        inputs = inputs._replace(cond_feature=jax.jit(self.condition)(params, inputs.lq))
        init, traj = latents, []
        state = self.scheduler.init_state(latents)
        for i in range(self.settings.num_steps):
            state, latents = self._step(params, state, inputs, jnp.int32(i))
            traj.append(latents)
        decoded = jax.jit(self.decode)(params, latents)
        out = {"init_latents": init, "final_latents": latents,
               "decoded": decoded, "image": jnp.clip(decoded / 2 + 0.5, 0.0, 1.0), "trajectory": jnp.stack(traj)}
        if z0 is not None:
            out["vae_latent_z0"] = z0
        return out


def interleave_cfg(text: jnp.ndarray) -> jnp.ndarray:
    """[neg_0 … neg_B−1; pos_0 … pos_B−1] -> [neg_0, pos_0, neg_1, pos_1, …] ([2B, L, D])."""
    b2 = text.shape[0]
    return text.reshape((2, b2 // 2) + text.shape[1:]).swapaxes(0, 1).reshape(text.shape)


def make_inputs(lq, text, noises: Noises, *, guidance_scale: float, conditioning_scale: float = 1.0,
                added_noise_level: int = 900) -> SampleInputs:
    """Pack host values into `SampleInputs` with the dtypes the compiled sampler expects."""
    return SampleInputs(lq=jnp.asarray(lq, jnp.float32), text=jnp.asarray(text, jnp.float32), noises=noises,
                        guidance_scale=jnp.float32(guidance_scale), conditioning_scale=jnp.float32(conditioning_scale),
                        added_noise_level=jnp.int32(added_noise_level))


def latent_shape(models, lq_shape: tuple) -> tuple:
    """[B, H, W, 3] image shape -> [B, H/8, W/8, latent_channels]."""
    b, h, w, _ = lq_shape
    d = models.latent_downscale
    if h % d or w % d:
        raise ValueError(f"image {h}x{w} is not a multiple of {d}; pre-process it first")
    return (b, h // d, w // d, models.vae.latent_channels)

