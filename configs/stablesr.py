"""StableSR fine-tuning (STABLESR_REFERENCE §9.1): the time-aware encoder + SFT layers over a frozen SD2.1.

The model comes from a converted StableSR folder (`python -m convert stablesr ...`): its SD2.1 UNet
(frozen except `spade`), time-aware encoder (trainable), first-stage encoder (frozen) and the
empty-prompt context (every training caption is '' in the reference). Recipe of
`configs/stableSRNew/v2-finetune_text_T_512.yaml`: AdamW lr 5e-5 (no scaling), betas (0.9, 0.999),
weight decay 0.01, batch 6 × accumulation 4, 512² GT crops with Real-ESRGAN second-order
degradation, LR bicubically resized back to 512, eps loss at t ~ U{0..999}.

The step is `pasd_jax.train.stablesr_step.train_step`; `tiny` is the smoke model at 64 px.
Not yet wired into `train.py`'s loop (which builds PASD models); see the report / README.
"""

from configs import common
from pasd_jax.train.stablesr_step import TRAINABLE


def get_config(arg: str | None = None):
    v = common.parse_arg(arg, tiny=False)
    c = common.base_config()
    c.method = "stablesr"
    c.base = ""                        # converted StableSR folder; "tiny": the built-in smoke model
    c.train.trainable = TRAINABLE
    c.train.dr_loss_weight = 0.0       # no DR net in StableSR
    c.train.total_steps = 800_000
    c.train.ckpt_every = 1_500
    c.data.null_prompt_prob = 1.0      # the reference trains with '' for every sample
    c.data.batch_per_device = 6
    c.optim.lr = 5e-5
    c.optim.weight_decay = 1e-2
    c.optim.clip_norm = 0.0            # Lightning default: no gradient clipping
    c.optim.grad_accum = 4
    if v.tiny:
        c.base = "tiny"
        c.data.resolution = 64
        c.data.batch_per_device = 2
        c.data.num_workers = 0
        c.optim.grad_accum = 1
        c.optim.lr = 1e-3
        c.train.total_steps = 30
    c.lock()
    return c
