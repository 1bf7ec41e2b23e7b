"""Load everything PASD sampling needs from converted folders: nets, weights, tokenizer, schedule.

The torch-side counterpart is `test_pasd.py`'s model loading: `UNet2DConditionModel` and
`ControlNetModel` from a PASD `checkpoint-N/`, VAE, text encoder, tokenizer and scheduler from the
SD1.5 base (PASD_REFERENCE §6, §7.1). Here every part is a converted folder (`python -m convert`):

* `ckpt`: a converted PASD checkpoint (`unet/` with PACA or `_plus` weights, `controlnet/`), or a
  whole converted PASD pipeline that also holds `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`;
* `base` (optional): a name registered with `python -m convert base` or a converted pipeline path.
  With a base, every stock UNet weight, the VAE, the text encoder, the tokenizer (and the scheduler
  unless `ckpt` has one) come from the base; PASD's PACA / `_plus` weights and the ControlNet stay from `ckpt`
  (`pasd_jax.assembly.home.merge_base_unet`).

Scheduler: the config of `ckpt/scheduler/` (a PASD checkpoint that ships its own, like the
colorization model) or else the base's; its `_class_name` picks the default sampler when it is one
we implement (DDIM, UniPC, DPM-Solver++, LCM), otherwise DDIM. An LCM-LoRA (`lcm_lora=`) is fused
into the stock UNet weights (PACA / `*_plus` and the ControlNet untouched) and makes LCM the default.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from pasd_jax.assembly import defaults, home, paths, registry, weights
from pasd_jax.assembly.bundle import PASDBundle
from pasd_jax.assembly.tokenizer import load_tokenizer
from pasd_jax.diffusion.schedule import NoiseSchedule, load_scheduler_config
from pasd_jax.diffusion.schedulers import SCHEDULER_CLASSES
from pasd_jax.models.configs import UnsupportedConfigError

SCHEDULER_FILE = "scheduler_config.json"


def _find_part(name: str, *folders: Optional[pathlib.Path]) -> pathlib.Path:
    for folder in folders:
        if folder is not None and (folder / name).is_dir():
            return folder / name
    where = " or ".join(str(f) for f in folders if f is not None)
    raise FileNotFoundError(f"no {name}/ in {where}; a PASD checkpoint holds only unet/ and controlnet/ — "
                            f"pass --base NAME_OR_PATH (a converted SD1.5 pipeline, see `python -m convert base`)")


def _read_manifest(folder: pathlib.Path) -> dict:
    path = folder / weights.MANIFEST_NAME
    if not path.is_file():
        return {}
    return weights.read_config(path)


def scheduler_config(ckpt: str | os.PathLike, base_dir: Optional[pathlib.Path] = None,
                     scheduler: str | os.PathLike | None = None) -> tuple[dict, str]:
    """The scheduler config `load_models` uses, and where it came from (cheap: reads one JSON file).

    `scheduler` (a file or folder) wins; else the checkpoint's own `scheduler/` (as the colorization
    model ships), then the base's; else
    SD1.5's (`assembly.defaults.SCHEDULER`). Callers use it to check flags against the schedule
    (e.g. T = `num_train_timesteps`) before the weights load. Raises ValueError naming the file.
    """
    ckpt = pathlib.Path(ckpt)
    src = pathlib.Path(scheduler) if scheduler is not None else None
    if src is None:
        dirs = (ckpt, base_dir) if base_dir is not None else (ckpt,)
        found = [d / "scheduler" for d in dirs if (d / "scheduler" / SCHEDULER_FILE).is_file()]
        src = found[0] if found else None
    if src is None:
        return dict(defaults.SCHEDULER), "the SD1.5 default scheduler"
    where = str(src if src.is_file() else src / SCHEDULER_FILE if (src / SCHEDULER_FILE).is_file() else src)
    try:
        cfg = load_scheduler_config(src)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: scheduler config is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    T = cfg.get("num_train_timesteps", defaults.SCHEDULER["num_train_timesteps"])
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"{where}: num_train_timesteps must be a positive integer, got {T!r}")
    return (cfg or dict(defaults.SCHEDULER)), where


def _build(config: dict, folder: pathlib.Path, **overrides):
    """`registry.build_module`, with config errors naming the config file."""
    try:
        return registry.build_module(config, **overrides)
    except (KeyError, TypeError, ValueError, UnsupportedConfigError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{folder / weights.CONFIG_NAME}: cannot build the model from this config ({detail})") from None


def _check_shapes(got_tree, want_tree, folder: pathlib.Path) -> None:
    """Raise ValueError naming the weight file and the first missing / unexpected / mis-shaped leaves."""
    got = {k: tuple(v.shape) for k, v in paths.flatten(got_tree, sep=paths.SEP).items()}
    want = {k: tuple(v.shape) for k, v in paths.flatten(want_tree, sep=paths.SEP).items()}
    if got == want:
        return
    problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
    problems += [f"{k} has shape {got[k]}, config wants {want[k]}" for k in sorted(want.keys() & got.keys())
                 if got[k] != want[k]]
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    raise ValueError(f"{folder / weights.PARAMS_NAME}: weights do not fit {folder / weights.CONFIG_NAME} "
                     f"({shown}); edited folder, or base and PASD checkpoint of different architectures?")


def _load_tokenizer(folder: pathlib.Path):
    """`load_tokenizer`, with unreadable vocab/merges files reported by folder."""
    try:
        return load_tokenizer(folder)
    except FileNotFoundError:
        raise
    except Exception as err:  # transformers raises ValueError, JSONDecodeError, UnicodeDecodeError, TypeError, ...
        raise ValueError(f"{folder}: unreadable tokenizer files ({type(err).__name__}: {err})") from None


def default_scheduler_name(scheduler_config: dict) -> str:
    """CLI name of the config's `_class_name` when implemented (e.g. "unipc"), else "ddim"."""
    by_class = {cls: name for name, cls in SCHEDULER_CLASSES.items()}
    return by_class.get(scheduler_config.get("_class_name"), "ddim")


def load_models(ckpt: str | os.PathLike, base: str | os.PathLike | None = None, *,
                scheduler: str | os.PathLike | None = None, dtype=jnp.float32,
                scheduler_overrides: Optional[dict] = None, lcm_lora: str | os.PathLike | None = None,
                lora_fuser: Optional[Callable] = None) -> PASDBundle:
    """Load a converted PASD checkpoint (+ optional base) for sampling.

    Args:
      ckpt: converted folder with `unet/` (family pasd or pasd_light) and `controlnet/`.
      base: base name or path; provides VAE, text encoder, tokenizer, scheduler and the stock UNet
        weights. Without it they must be in `ckpt`.
      scheduler: a scheduler config file/folder overriding the one in base/ckpt (default:
        `assembly.defaults.SCHEDULER`, SD1.5's DDIM settings, when none is found).
      lcm_lora: an LCM-LoRA file fused into the UNet (after any base swap); makes "lcm" the default.
      lora_fuser: `(path, unet_params, text_params, unet_config) -> (unet_params, text_params)` that does
        the fusing — `convert.lora.fuse_lora_file`, handed in by `sample.py` because `pasd_jax` never
        imports `convert` (README "Layout").
      dtype: compute dtype of UNet and ControlNet (params stay float32); VAE and text encoder
        compute in float32 (STYLE §2.3).
    Raises FileNotFoundError / ValueError with the folder and the problem named.
    """
    ckpt = pathlib.Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"PASD checkpoint folder not found: {ckpt}")
    base_dir = home.resolve_base(base) if base is not None else None
    unet_dir = _find_part("unet", ckpt)
    unet_cfg, unet_params = weights.load_converted(unet_dir)
    family = unet_cfg.get(registry.FAMILY_KEY, "stock")
    if family not in ("pasd", "pasd_light"):
        raise ValueError(f"{ckpt / 'unet'} is a {family} UNet; PASD sampling needs a PASD UNet "
                         f"(pixel_attentions or attn2_plus weights) — is {ckpt} a PASD checkpoint?")
    if base_dir is not None:
        base_unet_dir = _find_part("unet", base_dir)
        _, base_unet = weights.load_converted(base_unet_dir)
        unet_params = home.merge_base_unet(unet_params, base_unet, what=f"{base_unet_dir / weights.PARAMS_NAME} "
                                                                        f"onto {unet_dir / weights.PARAMS_NAME}")
    cn_dir = _find_part("controlnet", ckpt)
    cn_cfg, cn_params = weights.load_converted(cn_dir)

    part_dirs = (base_dir, ckpt) if base_dir is not None else (ckpt,)
    vae_dir, text_dir = _find_part("vae", *part_dirs), _find_part("text_encoder", *part_dirs)
    vae_cfg, vae_params = weights.load_converted(vae_dir)
    text_cfg, text_params = weights.load_converted(text_dir)
    tokenizer = _load_tokenizer(_find_part("tokenizer", *part_dirs))

    if lcm_lora is not None:
        if lora_fuser is None:
            raise ValueError("--lcm-lora needs the converter's LoRA reader: run sample.py (it passes "
                             "convert.lora.fuse_lora_file), or merge it first with python -m convert --lora")
        try:
            unet_params, text_params = lora_fuser(lcm_lora, unet_params, text_params, unet_cfg)
        except ValueError as err:  # convert.lora.LoraError
            raise ValueError(f"--lcm-lora: {err}") from None

    sched_cfg, sched_where = scheduler_config(ckpt, base_dir, scheduler)
    try:
        schedule = NoiseSchedule.from_config(sched_cfg, **(scheduler_overrides or {}))
    except (KeyError, TypeError, ValueError, UnsupportedConfigError) as err:
        raise ValueError(f"{sched_where}: unusable scheduler config ({err})") from None

    cfgs = {"unet": (unet_cfg, unet_dir), "controlnet": (cn_cfg, cn_dir), "vae": (vae_cfg, vae_dir),
            "text_encoder": (text_cfg, text_dir)}
    modules = {name: _build(cfg, folder, **({"dtype": dtype} if name in ("unet", "controlnet") else {}))
               for name, (cfg, folder) in cfgs.items()}
    raw = {"unet": unet_params, "controlnet": cn_params, "vae": vae_params, "text_encoder": text_params}
    for name, module in modules.items():  # shapes must match the configs (edited folders, mixed bases)
        _check_shapes(raw[name], registry.abstract_params(module), cfgs[name][1])
    text_dim, unet_dim = modules["text_encoder"].hidden_size, modules["unet"].cross_dims()[0]
    if unet_dim != text_dim:
        raise ValueError(f"the UNet expects text width {unet_dim} but the text encoder gives {text_dim} "
                         f"(an SD1 base with an SD2 PASD checkpoint, or the reverse?)")
    params = jax.device_put(raw)
    smoke = bool(_read_manifest(ckpt).get("smoke_model"))
    default = "lcm" if lcm_lora is not None else default_scheduler_name(sched_cfg)
    return PASDBundle(params=params, tokenizer=tokenizer, schedule=schedule, family=family,
                      source=str(ckpt), smoke=smoke, scheduler_config=dict(sched_cfg), default_scheduler=default,
                      **modules)
