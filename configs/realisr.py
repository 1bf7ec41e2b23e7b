"""PASD real-world super-resolution training (PASD_REFERENCE §8), with variants.

Launch (a converted SD1.5 pipeline in `weights/sd15`, training images under `data/hq`):

    python train.py --config configs/realisr.py --workdir runs/realisr \
        --config.base=weights/sd15 --config.data.paths='("data/hq",)'

Variants (`--config configs/realisr.py:VARIANT[,VARIANT…]`):

    light   PASD-light UNet (`*_plus` modules instead of PACA)
    rrdb    two RRDBs in the DR net (the released `pasd_rrdb` model)
    color   colorization: grayscale condition, pasd_light, v-prediction + zero terminal SNR
    tiny    CPU-sized smoke run on the built-in tiny model (batch 2, 64 px, seconds per step):
            python train.py --config configs/realisr.py:tiny --workdir /tmp/pasd_tiny \
                --config.data.paths='("../shared/data/Set14",)'

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

from configs import common


def get_config(arg: str | None = None):
    """The paper's recipe, adjusted by the comma-separated variants in `arg`."""
    v = common.parse_arg(arg, light=False, rrdb=False, color=False, tiny=False)
    c = common.base_config()
    if v.light:
        c.model.family = "pasd_light"
    if v.rrdb:
        c.model.use_rrdb = True
    if v.color:
        c.model.family = "pasd_light"
        c.model.prediction_type = "v_prediction"
        c.model.zero_terminal_snr = True
        c.data.mode = "grayscale"
        c.train.colorfulness_weight = 0.003
    if v.tiny:
        c.base = "tiny"
        c.data.resolution = 64
        c.data.batch_per_device = 2
        c.data.num_workers = 0
        c.train.total_steps = 30
        c.train.log_every = 5
        c.train.ckpt_every = 10
        c.train.validate_every = 30
        c.train.val_images = 2
        c.train.val_steps = 4
        c.optim.lr = 1e-3  # random toy weights: a large step so a 30-step run visibly learns
        c.mesh.fsdp_min_size = 256
    c.lock()
    return c
