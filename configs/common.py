"""Shared pieces of the training configs: the variant parser and the field groups.

`configs/realisr.py:light,rrdb` reaches `get_config("light,rrdb")`; `parse_arg` turns that into
a ConfigDict of booleans/values (big_vision's `configs/common.py` pattern). The default field
groups follow STYLE §2.2: `model`, `data`, `optim`, `train`, `mesh`, `dtype`.
"""

from __future__ import annotations

import ml_collections as mlc


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """"light,res=256" -> {light: True, res: 256} over `defaults` (values typed like the default)."""
    out = mlc.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config variant {key!r}; known: {', '.join(sorted(defaults))}")
        out[key] = type(defaults[key])(value) if value else True
    return out


def realesrgan_degradation() -> mlc.ConfigDict:
    """Real-ESRGAN second-order degradation parameters of PASD's `params_realesrgan.yml` (§8)."""
    kernel_list = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
    kernel_prob = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    blur = dict(kernel_range=(7, 21), sinc_prob=0.1, kernel_list=kernel_list, kernel_prob=kernel_prob,
                betag=(0.5, 4.0), betap=(1.0, 2.0))
    return mlc.ConfigDict(dict(
        scale=4,
        blur1=dict(blur, sigma=(0.2, 3.0)),
        blur2=dict(blur, sigma=(0.2, 1.5)),
        final_sinc_prob=0.8,
        # first degradation
        resize_prob=(0.2, 0.7, 0.1), resize_range=(0.3, 1.5),
        gaussian_noise_prob=0.5, noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0),
        gray_noise_prob=0.4, jpeg_range=(60.0, 95.0),
        # second degradation
        second_blur_prob=0.5,
        resize_prob2=(0.3, 0.4, 0.3), resize_range2=(0.6, 1.2),
        gaussian_noise_prob2=0.5, noise_range2=(1.0, 12.0), poisson_scale_range2=(0.05, 1.0),
        gray_noise_prob2=0.4, final_jpeg_range=(60.0, 100.0),
    ))


def base_config() -> mlc.ConfigDict:
    """Every field a training run reads, at the paper's values (PASD_REFERENCE §8)."""
    c = mlc.ConfigDict()
    c.seed = 0
    # A converted SD1.5 pipeline folder (`python -m convert`): unet/ vae/ text_encoder/ tokenizer/
    # scheduler/ (+ controlnet/ if present). "tiny" writes the built-in smoke model into the workdir.
    c.base = ""
    # Optional converted PASD checkpoint folder (unet/ and controlnet/) to fine-tune from.
    c.init_from = ""

    c.model = mlc.ConfigDict()
    c.model.family = "pasd"            # "pasd" (PACA) or "pasd_light" (`*_plus` modules)
    c.model.use_rrdb = False           # two RRDBs in the DR net (the `rrdb` released checkpoint)
    c.model.prediction_type = ""       # "" keeps the base scheduler's; "v_prediction" for colorization
    c.model.zero_terminal_snr = False  # rescale betas to zero terminal SNR (colorization)

    c.data = mlc.ConfigDict()
    c.data.source = "folders"          # "folders", "array_record" or "tfds"
    c.data.paths = ()                  # image folders (recursive) or array_record files
    c.data.tfds_name = ""              # "name[/config]" prepared with file_format=array_record (no TF needed)
    c.data.tfds_data_dir = ""          # default $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.split = "train"
    c.data.resolution = 512            # HQ crop side
    c.data.batch_per_device = 4
    c.data.global_batch = 0            # > 0 overrides batch_per_device × devices (same run on any mesh)
    c.data.null_prompt_prob = 0.5      # PASD's null_text_ratio
    c.data.mode = "realesrgan"         # or "grayscale" (colorization: condition = luma of the crop)
    # Where the Real-ESRGAN pixels are degraded: "host" (grain workers, numpy/PIL) or "device"
    # (workers only draw parameters; a jitted batch degradation runs before the train step).
    c.data.degrade_on = "host"
    c.data.caption_ext = ".txt"        # sidecar caption beside each image; empty prompt if absent
    c.data.min_side = 32               # smaller images are skipped (logged); others are enlarged like PASD
    c.data.max_bad_in_a_row = 16       # this many unreadable records in a row is an error, not a hang
    c.data.num_workers = 8
    c.data.prefetch = 2
    c.data.degradation = realesrgan_degradation()

    c.optim = mlc.ConfigDict()
    c.optim.lr = 5e-5                  # train_pasd.sh; constant schedule
    c.optim.warmup_steps = 0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.weight_decay = 1e-2
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1             # PASD used 2 (optax.MultiSteps; total_steps counts micro-steps)

    c.train = mlc.ConfigDict()
    c.train.total_steps = 100_000
    # PASD's --trainable_modules: all of the ControlNet (incl. DR net) + PACA / light `_plus` params.
    c.train.trainable = ("^controlnet/", "pixel_attentions", "norm2_plus", "attn2_plus", "proj_in_plus")
    c.train.dr_loss_weight = 1.0       # γ of the multi-scale to_rgbs L1 loss
    c.train.colorfulness_weight = 0.0  # 0.003 reproduces the reference's (triple-counted) 0.001
    c.train.remat_policy = "none"      # per-block remat: "none", "full", "dots" or "attention" (nn/remat.py)
    c.train.log_every = 50
    c.train.ckpt_every = 5_000
    c.train.keep_checkpoints = 3
    c.train.validate_every = 5_000
    c.train.val_images = 4
    c.train.val_steps = 20
    c.train.transfer_guard = True

    c.mesh = mlc.ConfigDict()
    c.mesh.data = -1                   # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.mesh.fsdp_min_size = 2**20       # params with fewer elements stay replicated
    # (regex on "component/…/leaf", spec): spec "fsdp" shards the largest divisible dim, "replicate".
    c.mesh.rules = (("^text_encoder/", "replicate"),)

    c.dtype = mlc.ConfigDict()
    c.dtype.compute = "float32"        # "bfloat16": bf16 activations, fp32 params and optimizer
    c.dtype.vae_compute = "float32"
    # "bfloat16": the frozen weights (UNet trunk, VAE, text encoder) live on the device in bf16;
    # trainable params keep float32 master weights and optimizer state; the export is float32.
    c.dtype.frozen_params = "float32"
    return c
