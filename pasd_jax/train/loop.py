"""`train(config, workdir)`: the training loop as a library function (big_vision-shaped `main`).

Sections: distributed start-up → workdir/config → base weights → mesh → models/optimiser →
shardings and initial state → data → checkpoint resume → compiled step → loop (log, checkpoint,
validate, SIGTERM) → export. Re-running with the same workdir resumes from the newest checkpoint:
trainable params, optimiser state, step, rng and the grain iterator state are restored, so the
resumed run repeats the uninterrupted run's losses exactly. The final weights are exported to
`workdir/export` as a converted pipeline folder that `sample.py` loads. With
`data.degrade_on = "device"` each batch is degraded on the devices (`device_degrader`) between
the data iterator and the step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.assembly import registry
from pasd_jax.assembly.bundle import PASDBundle
from pasd_jax.data import device_degrade, pipeline
from pasd_jax.diffusion.schedule import NoiseSchedule
from pasd_jax.nn.remat import check_policy
from pasd_jax.train import checkpoint, sharding, validate
from pasd_jax.train import workdir as records
from pasd_jax.train.metrics import MetricWriter
from pasd_jax.train.optim import make_optimizer
from pasd_jax.train.state import TrainState, count_params, merge, split
from pasd_jax.train.step import StepOptions, degrade_step, train_step

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Jitted train steps by model/settings key: a second `train()` in one process (a resumed run in
# tests, a notebook) skips re-tracing, which costs tens of seconds even for the tiny model.
_STEP_CACHE: dict[str, object] = {}


def resolve_base(config, workdir: str) -> str:
    """The converted base folder; "tiny" writes the smoke model into `workdir/tiny_base` once.

    The smoke-model fixture is imported only here, for the `:tiny` demo config."""
    if config.base == "tiny":
        from pasd_jax.fixtures.tiny import make_tiny_pipeline

        dst = os.path.join(workdir, "tiny_base")
        if not os.path.isdir(dst) and jax.process_index() == 0:
            make_tiny_pipeline(dst, family=config.model.family, use_rrdb=config.model.use_rrdb, seed=config.seed)
        return dst
    if not config.base or not os.path.isdir(config.base):
        raise FileNotFoundError(f"config.base={config.base!r} is not a folder; convert SD1.5 with "
                                f"`python -m convert` and pass --config.base=DIR (or use :tiny)")
    return config.base


def build_models(configs: dict, config, schedule: NoiseSchedule, source: str = "training") -> PASDBundle:
    """The networks with the configured compute dtypes, per-block remat (`train.remat_policy`,
    `pasd_jax.nn.remat`) in the UNet and ControlNet, and the training schedule; no params (they
    live in the train state and the frozen tree)."""
    compute = DTYPES[config.dtype.compute]
    remat = check_policy(config.train.remat_policy)
    unet = registry.build_module(configs["unet"], dtype=compute).clone(remat_policy=remat)
    return PASDBundle(
        unet=unet, controlnet=registry.build_module(configs["controlnet"], dtype=compute).clone(remat_policy=remat),
        vae=registry.build_module(configs["vae"], dtype=DTYPES[config.dtype.vae_compute]),
        text_encoder=registry.build_module(configs["text_encoder"], dtype=compute),
        schedule=schedule, family=unet.family, source=source)


def schedule_overrides(config) -> dict:
    """The variant's scheduler changes (prediction type, zero terminal SNR) as config.json keys."""
    overrides = {}
    if config.model.prediction_type:
        overrides["prediction_type"] = config.model.prediction_type
    if config.model.zero_terminal_snr:
        overrides["rescale_betas_zero_snr"] = True
    return overrides


def base_scheduler_json(base: str) -> str:
    """The base's scheduler config file content (part of the compiled-step cache key)."""
    path = os.path.join(base, "scheduler", "scheduler_config.json")
    return open(path).read() if os.path.isfile(path) else ""


def build_schedule(base: str, config) -> NoiseSchedule:
    """The base's scheduler with `schedule_overrides(config)` applied."""
    return NoiseSchedule.load(os.path.join(base, "scheduler"), **schedule_overrides(config))


class _Stop:
    """Remembers a SIGTERM so the loop can checkpoint and exit cleanly (single process).

    Multi-host jobs must not install it: `jax.distributed` runs a preemption service that catches
    SIGTERM and lets every host agree on the step (`CheckpointManager.reached_preemption`).
    """

    def __init__(self, install: bool = True):
        self.requested = False
        self._install = install
        self._old = None

    def __enter__(self):
        if self._install:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: checkpointing and stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(config, workdir: str, *, stop_after: int | None = None, allow_config_change: bool = False) -> dict:
    """Train (or resume) in `workdir`. `stop_after` ends the loop early at that step (tests:
    an interrupted run). Returns {"step", "last_metrics", "export", "state", "frozen"} (device trees)
    and "stopped" (ended before `train.total_steps`)."""
    sharding.maybe_initialize_distributed()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    config_json = json.loads(config.to_json_best_effort())
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    if ckpt.latest_step() is not None:  # refuse a config the checkpoint cannot follow before loading anything
        records.check_resume(workdir, config_json, ckpt.latest_step(), allow=allow_config_change)

    # ---- Base weights, models, schedule --------------------------------------------------------------
    base = resolve_base(config, workdir)
    configs, params = checkpoint.load_initial_params(base, family=config.model.family, use_rrdb=config.model.use_rrdb,
                                                     init_from=config.init_from, seed=config.seed)
    models = build_models(configs, config, build_schedule(base, config), source=base)
    trainable, frozen = split(params, config.train.trainable)
    if config.dtype.frozen_params == "bfloat16":  # frozen trunk, VAE, text encoder: half the memory
        frozen = jax.tree_util.tree_map(_to_bf16, frozen)
    log.info("trainable params: %d, frozen: %d", count_params(trainable), count_params(frozen))

    # ---- Mesh, optimiser, shardings, initial state ----------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules, min_size = tuple(tuple(r) for r in config.mesh.rules), config.mesh.fsdp_min_size
    tx, lr_fn = make_optimizer(config.optim)
    create = functools.partial(TrainState.create, tx=tx, seed=config.seed)
    abstract_state = jax.eval_shape(create, trainable)
    state_sh = sharding.tree_shardings(abstract_state, mesh, rules, min_size)
    frozen_sh = sharding.tree_shardings(frozen, mesh, rules, min_size)
    frozen = sharding.put(frozen, frozen_sh)
    trainable = sharding.put(trainable, state_sh.params)

    # ---- Data ---------------------------------------------------------------------------------------
    global_batch = config.data.global_batch or config.data.batch_per_device * jax.device_count()
    if global_batch % jax.device_count():
        raise ValueError(f"global batch {global_batch} is not divisible by the {jax.device_count()} devices")
    local_batch = global_batch // jax.process_count()
    tokenizer_dir = os.path.join(base, "tokenizer")
    source = pipeline.make_source(config.data)
    log.info("training data: %d records (%s), global batch %d (%d per process)", len(source), source, global_batch,
             local_batch)
    dataset = pipeline.make_dataset(config.data, seed=config.seed, local_batch=local_batch,
                                    tokenizer_dir=tokenizer_dir, process_index=jax.process_index(),
                                    process_count=jax.process_count(), source=source)
    data_iter = iter(dataset)

    # ---- Checkpoint: resume or start --------------------------------------------------------------------
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, state_sh)
    restored = ckpt.restore_latest(target)  # falls back past unreadable checkpoints, with a warning
    if restored is not None:
        start, state, iter_state = restored
        data_iter.set_state(iter_state)
        log.info("resumed from step %d", start)
    else:
        start, state = 0, jax.jit(create, out_shardings=state_sh)(trainable)
    del trainable, params
    if jax.process_index() == 0:  # this start's config; metrics rows past the resumed step go
        records.record_start(workdir, config_json, start)
        records.truncate_metrics(workdir, start)

    # ---- Compiled step --------------------------------------------------------------------------------
    opts = StepOptions(dr_loss_weight=config.train.dr_loss_weight,
                       colorfulness_weight=config.train.colorfulness_weight,
                       latent_scale=float(models.vae.scaling_factor))
    batch_sh = sharding.batch_sharding(mesh)
    step_key = json.dumps([configs, config.optim.to_dict(), config.model.to_dict(), config.dtype.to_dict(),
                           config.mesh.to_dict(), list(config.train.trainable), dataclasses.asdict(opts),
                           base_scheduler_json(base), [d.id for d in mesh.devices.flat]], sort_keys=True, default=str)
    if step_key not in _STEP_CACHE:  # same model and settings in this process: reuse the traced step
        _STEP_CACHE[step_key] = jax.jit(
            functools.partial(train_step, models=models, tx=tx, lr_fn=lr_fn, opts=opts,
                              grad_accum=config.optim.grad_accum),
            in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
            donate_argnums=0)
    step_fn = _STEP_CACHE[step_key]
    to_step_batch = device_degrader(config, mesh)  # identity unless data.degrade_on == "device"

    val = None
    if config.train.validate_every > 0:
        val_batch = pipeline.validation_examples(config.data, seed=config.seed, count=config.train.val_images,
                                                 tokenizer_dir=tokenizer_dir, source=source)
        val_fn = validate.make_val_sampler(models, config.train.val_steps,
                                           out_sharding=sharding.replicated(mesh))
        val = (val_batch, jax.device_put({k: val_batch[k] for k in ("lq", "prompt_ids")}, sharding.replicated(mesh)),
               val_fn)

    # ---- Loop ------------------------------------------------------------------------------------------
    writer = MetricWriter(workdir)
    step = int(jax.device_get(state.step))
    total = config.train.total_steps
    multi_host = jax.process_count() > 1
    batch = None
    if step < total:  # compile ahead of time, so every host enters the first collective together
        batch = to_step_batch(sharding.global_batch(next(data_iter), mesh))
        step_fn = compile_step(step_fn, state, frozen, batch)
    pending, last, t0, steps_since, waited = [], {}, time.perf_counter(), 0, 0.0
    with _Stop(install=not multi_host) as stop:
        while step < total:
            if batch is None:
                t_wait = time.perf_counter()
                batch = to_step_batch(sharding.global_batch(next(data_iter), mesh))
                waited += time.perf_counter() - t_wait
            with jax.transfer_guard("disallow" if config.train.transfer_guard else "allow"):
                state, metrics = step_fn(state, frozen, batch)
            batch = None
            step += 1
            steps_since += 1
            pending.append(metrics)
            preempted = stop.requested or (multi_host and ckpt.manager.reached_preemption(step))
            stopping = preempted or (stop_after is not None and step >= stop_after)
            saving = step % config.train.ckpt_every == 0 or step == total or preempted
            if step % config.train.log_every == 0 or step == total or saving or stopping:
                host = jax.device_get(pending)
                elapsed = time.perf_counter() - t0
                for i, m in enumerate(host):
                    row = dict(m)
                    if i == len(host) - 1:
                        row["step_time_s"] = elapsed / steps_since
                        row["images_per_s"] = global_batch * steps_since / elapsed
                        row["data_wait_share"] = waited / elapsed  # host input pipeline not keeping up
                    writer.write(step - len(host) + 1 + i, row, echo=i == len(host) - 1)
                last = {k: float(v) for k, v in host[-1].items()}
                if not np.isfinite(last["loss"]):
                    raise FloatingPointError(f"non-finite loss {last['loss']} at step {step} "
                                             f"(the step guard kept the parameters of step {step - 1})")
                pending, t0, steps_since, waited = [], time.perf_counter(), 0, 0.0
            if saving:  # every row up to a checkpointed step is in metrics.jsonl before its save
                ckpt.save(step, state, data_iter.get_state(), config_json, force=True)
            if val is not None and (step % config.train.validate_every == 0 or step == total):
                val_batch, val_in, val_fn = val
                full = merge(state.params, frozen)
                sr = jax.device_get(val_fn(full, val_in["lq"], val_in["prompt_ids"], jax.random.key(config.seed)))
                if jax.process_index() == 0:
                    path = validate.save_grid(workdir, step, val_batch["lq"], np.asarray(sr), val_batch["hq"])
                    log.info("validation image written: %s", os.path.relpath(path, workdir))
                t0 = time.perf_counter()  # validation time is not step time
            if stopping:
                break
    ckpt.close()
    writer.close()

    export = None
    if step >= total:
        frozen_host = frozen
        if config.dtype.frozen_params != "float32":  # export the base's float32 weights, not the bf16 copy
            frozen_host = split(checkpoint.load_initial_params(base, family=config.model.family,
                                                               use_rrdb=config.model.use_rrdb, init_from=config.init_from,
                                                               seed=config.seed)[1], config.train.trainable)[1]
        full = jax.tree_util.tree_map(_to_host, merge(state.params, frozen_host))
        export = os.path.join(workdir, "export")
        if jax.process_index() == 0:
            checkpoint.export_converted(export, base, configs, full,
                                        scheduler_overrides=schedule_overrides(config))
            log.info("export written: %s (python sample.py --ckpt %s ...)", export, export)
    stopped = step < total  # SIGTERM / preemption / stop_after: a checkpoint of `step` was saved
    return {"step": step, "last_metrics": last, "export": export, "state": state, "frozen": frozen,
            "stopped": stopped}


def device_degrader(config, mesh):
    """The batch map before the train step: identity for `data.degrade_on = "host"`; for "device",
    `degrade_step` per example on each device's slice of the batch (`sharding.per_example`),
    jitted once per canvas and mesh in this process."""
    if config.data.get("degrade_on", "host") != "device":
        return lambda batch: batch
    res = config.data.resolution
    canvas = device_degrade.canvas_for((res, res), config.data.degradation.to_dict())
    key = json.dumps(["degrade", dataclasses.asdict(canvas), [d.id for d in mesh.devices.flat]])
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = sharding.per_example(functools.partial(degrade_step, canvas=canvas), mesh)
    return _STEP_CACHE[key]


def compile_step(step_fn, state, frozen, batch):
    """`step_fn` compiled ahead of time for these arguments (logged), then a barrier of all
    processes: a host that compiles faster must not wait in the first collective long enough to
    hit its set-up timeout (30 s for gloo on CPU)."""
    log.info("compiling the train step (batch %d on %d devices)...", batch["hq"].shape[0], jax.device_count())
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, frozen, batch).compile()
    log.info("train step compiled in %.1f s", time.perf_counter() - t0)
    sharding.barrier("pasd_jax_train_step_compiled")
    return compiled


def _to_bf16(x):
    x = np.asarray(x)
    return x.astype(jnp.bfloat16) if np.issubdtype(x.dtype, np.floating) else x


def _to_host(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as a full numpy array on every host."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
