"""Checkpoints (orbax) in the workdir, initial weights, and export to a converted folder.

* `Checkpointer`: an orbax `CheckpointManager` under `workdir/checkpoints` saving a Composite of
  `state` (TrainState: trainable params, optimiser state, step, rng), `data_iter` (the grain
  iterator state, JSON) and `config` (JSON); async, keeps the newest N, restores into the
  requested shardings. The frozen base weights are never re-saved: they are re-read from
  `config.base`, which the saved config records (STYLE §2.5).
* `load_initial_params`: base converted pipeline (+ optional converted PASD checkpoint to
  fine-tune), building PASD's initial ControlNet from the UNet trunk when the base has none
  (diffusers `ControlNetModel.from_unet`, PASD_REFERENCE §8).
* `export_converted`: the trained result as a converted pipeline folder `sample.py` loads:
  `unet/` and `controlnet/` written with `save_converted`, `vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/` copied from the base. The converter turns it into PyTorch. (The reference's final
  `save_pretrained` writes ControlNet and UNet into one folder where they overwrite each other,
  PASD_REFERENCE §9.10; here each component has its own folder.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pasd_jax.assembly import registry, weights
from pasd_jax.assembly.init import init_params
from pasd_jax.models.controlnet import controlnet_config_from_unet, controlnet_params_from_unet

log = logging.getLogger(__name__)
COPIED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir can be restored."""


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` (see module doc)."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter_state: dict, config_json: dict, *, force: bool = False) -> bool:
        """Start an (async) save of step `step`; returns whether a save was started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data_iter=ocp.args.JsonSave(_jsonable(data_iter_state)),
                                  config=ocp.args.JsonSave(config_json))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed as `abstract_state`'s shardings, data-iterator state) of `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data_iter=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data_iter"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data-iterator state) of the newest checkpoint that restores, or None when
        there is none. Unreadable newer ones are reported with a warning naming them and, once an
        intact one is found, moved aside to `checkpoints/corrupt-<step>` (kept, never overwritten,
        so the resumed run can save that step again). CheckpointError when none is intact."""
        bad = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, iter_state = self.restore(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - orbax/TensorStore raise many types for damaged files
                first = " ".join(str(err).split())[:300]
                log.warning("checkpoint %s is unreadable (%s: %s); trying an older one",
                            os.path.join(self.directory, str(step)), type(err).__name__, first)
                bad.append((step, f"{type(err).__name__}: {first}"))
                continue
            if bad:
                self._set_aside([b for b, _ in bad])
                log.warning("resuming from step %d, the newest intact checkpoint", step)
            return step, state, iter_state
        if bad:
            raise CheckpointError(f"no intact checkpoint in {self.directory}: step(s) "
                                  f"{', '.join(str(b) for b, _ in bad)} are unreadable (newest: {bad[0][1]}); "
                                  f"move that folder away to start again from step 0")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst, n = os.path.join(self.directory, f"corrupt-{step}"), 1
                while os.path.exists(dst):
                    dst, n = os.path.join(self.directory, f"corrupt-{step}.{n}"), n + 1
                os.rename(src, dst)
                log.warning("moved the unreadable checkpoint %s to %s", src, dst)
        from pasd_jax.train.sharding import barrier

        barrier("pasd_jax_checkpoints_set_aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _jsonable(x: Any) -> Any:
    """Grain iterator states may hold numpy scalars/bytes; make them JSON values."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        return x.decode("latin-1")
    return x


def _fix_family(unet_config: dict, family: str) -> dict:
    cfg = dict(unet_config)
    cfg[registry.FAMILY_KEY] = family
    return cfg


def load_initial_params(base: str, *, family: str, use_rrdb: bool, init_from: str = "",
                        seed: int = 0) -> tuple[dict, dict]:
    """(configs, params) of {"unet", "controlnet", "vae", "text_encoder"} for a fresh run.

    UNet: the base's weights into the `family` UNet; PACA / `_plus` params missing from the base
    get a seeded fresh init (`assembly.init.init_params`; PASD keeps PyTorch's default init there; PACA
    `proj_out` is not zero-initialised, §8). ControlNet: the base's `controlnet/` if it has one,
    else `from_unet` (trunk copied, DR net random, zero convs zero). `init_from` (a converted PASD
    checkpoint with unet/ and controlnet/) then overrides both. Params are numpy float32.
    """
    configs, params = {}, {}
    for part in ("vae", "text_encoder"):
        configs[part], params[part] = weights.load_converted(os.path.join(base, part))
    unet_cfg, unet_base = weights.load_converted(os.path.join(base, "unet"))
    configs["unet"] = _fix_family(unet_cfg, family)
    fresh = init_params(configs["unet"], seed)
    base_flat, fresh_flat = weights.flatten_params(unet_base), weights.flatten_params(fresh)
    unexpected = sorted(set(base_flat) - set(fresh_flat))
    if unexpected:
        raise ValueError(f"{base}/unet has parameters a {family} UNet lacks (e.g. {unexpected[:3]}); "
                         f"is model.family right?")
    params["unet"] = weights.unflatten_params({k: base_flat.get(k, v) for k, v in fresh_flat.items()})
    if os.path.isdir(os.path.join(base, "controlnet")):
        configs["controlnet"], params["controlnet"] = weights.load_converted(os.path.join(base, "controlnet"))
    else:
        configs["controlnet"] = controlnet_config_from_unet(unet_cfg, use_rrdb=use_rrdb)
        params["controlnet"] = controlnet_params_from_unet(params["unet"],
                                                           init_params(configs["controlnet"], seed + 1))
    if init_from:
        cn_cfg, cn_params = weights.load_converted(os.path.join(init_from, "controlnet"))
        configs["controlnet"], params["controlnet"] = cn_cfg, cn_params
        pasd_cfg, pasd_unet = weights.load_converted(os.path.join(init_from, "unet"))
        got_family = pasd_cfg.get(registry.FAMILY_KEY, family)
        if got_family != family:
            raise ValueError(f"{init_from}/unet is a {got_family} UNet but model.family={family!r}")
        # Every leaf the checkpoint has wins (PACA / `_plus` and, if stored, the trunk); anything it
        # lacks stays from the base, as `pasd_jax.assembly.home.merge_base_unet` does for sampling.
        current, stored = weights.flatten_params(params["unet"]), weights.flatten_params(pasd_unet)
        extra = sorted(set(stored) - set(current))
        if extra:
            raise ValueError(f"{init_from}/unet has parameters the {family} UNet lacks (e.g. {extra[:3]})")
        current.update(stored)
        params["unet"] = weights.unflatten_params(current)
    return configs, params


def export_converted(dst: str, base: str, configs: dict, params: dict, *, overwrite: bool = True,
                     scheduler_overrides: dict | None = None) -> str:
    """Write `dst/{unet,controlnet}` (trained) + copies of the base's other parts; returns `dst`.

    `params` holds at least "unet" and "controlnet" (host numpy or jax arrays, full trees).
    `scheduler_overrides` (e.g. v-prediction + zero terminal SNR of the colorization variant) are
    written into the copied `scheduler/scheduler_config.json`, so sampling uses the trained schedule.
    """
    with weights.staged_folder(dst, overwrite=overwrite) as staged:
        for part in ("unet", "controlnet"):
            host = jax.tree_util.tree_map(np.asarray, params[part])
            weights.save_converted(os.path.join(staged, part), configs[part], host, component=part)
        for part in COPIED_PARTS:
            src = os.path.join(base, part)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(staged, part))
        sched_file = os.path.join(staged, "scheduler", "scheduler_config.json")
        if scheduler_overrides and os.path.isfile(sched_file):
            with open(sched_file) as f:
                sched = json.load(f)
            sched.update(scheduler_overrides)
            with open(sched_file, "w") as f:
                json.dump(sched, f, indent=2)
        manifest_src = os.path.join(base, weights.MANIFEST_NAME)
        manifest = {}
        if os.path.isfile(manifest_src):
            with open(manifest_src) as f:
                manifest = json.load(f)
        # The base as a path relative to the export's workdir (the folder above `dst`), so a moved
        # or copied workdir still names it; absolute only when on another drive.
        try:
            base_ref = os.path.relpath(os.path.abspath(base), os.path.dirname(os.path.abspath(dst)))
        except ValueError:
            base_ref = os.path.abspath(base)
        manifest.update({"format_version": weights.FORMAT_VERSION, "trained_by": "pasd_jax.train",
                         "base": base_ref})
        weights.write_manifest(staged, manifest)
    return dst
