"""A PyTorch PASD UNet (the `pasd` family, with PACA) built from diffusers blocks: the baseline
that `cfg_step.py --torch pasd` times, the same network as ours in PyTorch.

PASD's own UNet (`pasd/models/pasd/unet_2d_condition.py`) is the stock SD UNet whose up blocks
also own `pixel_attentions`: one stock `Transformer2DModel` per ResNet layer whose
cross-attention context is the ControlNet residual that layer's skip came from
(PASD_REFERENCE §2). Its code is not in this repository; this module rebuilds that network from
the reference's description on top of a diffusers `UNet2DConditionModel`:

* `add_pixel_attentions(unet)` gives every up block its `pixel_attentions` ModuleList (heads and
  widths of §2.1: heads of the block, head dim `out // heads`, cross dim = channels of the skip the
  layer consumes; `out` for `UpBlock2D`), so `unet.state_dict()` has the reference's key names
  (`up_blocks.N.pixel_attentions.j.…`) and goes through our converter like a released PASD UNet;
* `pasd_unet_forward(unet, x, t, text, down, mid)` runs §2.2: stock down path, skips + residuals,
  mid block + mid residual, up path with concat → resnet → text transformer (cross-attention up
  blocks) → PACA(context = the un-summed residual of that skip, tokens y·W + x) per layer.

`tests/models/pasd_unet_torch_test.py` checks it against our Flax PASD UNet through the converter,
so the benchmark compares like with like. torch and diffusers are the `[test]` extra.
"""

from __future__ import annotations


def _skip_channels(unet) -> list[list[int]]:
    """Per up block, the channels of the skip each ResNet layer consumes (layer order)."""
    out_ch = list(reversed(unet.config.block_out_channels))
    chans = []
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        below = out_ch[min(i + 1, len(out_ch) - 1)]  # the block's in_channels (its last skip's width)
        chans.append([below if j == n - 1 else out_ch[i] for j in range(n)])
    return chans


def add_pixel_attentions(unet) -> None:
    """Give each up block of a diffusers `UNet2DConditionModel` PASD's `pixel_attentions` (in place)."""
    import torch
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    cfg = unet.config
    heads = cfg.num_attention_heads or cfg.attention_head_dim  # SD1.5's naming quirk: 8 = heads
    n_blocks = len(cfg.block_out_channels)
    heads = list(reversed(heads if isinstance(heads, (list, tuple)) else [heads] * n_blocks))
    out_ch = list(reversed(cfg.block_out_channels))
    for i, (block, skips) in enumerate(zip(unet.up_blocks, _skip_channels(unet))):
        cross = [out_ch[i]] * len(skips) if not getattr(block, "has_cross_attention", False) else skips
        block.pixel_attentions = torch.nn.ModuleList([
            Transformer2DModel(num_attention_heads=heads[i], attention_head_dim=out_ch[i] // heads[i],
                               in_channels=out_ch[i], num_layers=1, cross_attention_dim=c,
                               norm_num_groups=cfg.norm_num_groups,
                               use_linear_projection=cfg.use_linear_projection,
                               only_cross_attention=cfg.only_cross_attention,
                               upcast_attention=cfg.upcast_attention)
            for c in cross])


def pasd_unet_forward(unet, sample, timestep, text, down_residuals, mid_residual):
    """PASD UNet forward (PASD_REFERENCE §2.2) on a diffusers UNet given `add_pixel_attentions`.

    sample [B, 4, H, W], timestep [B], text [B, L, D], down_residuals: the ControlNet's 12 (SD1.5)
    down residuals, mid_residual its mid one (both already scaled) -> noise prediction [B, 4, H, W].
    """
    import torch

    emb = unet.time_embedding(unet.time_proj(timestep).to(sample.dtype))
    h = unet.conv_in(sample)
    skips = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(h, emb, encoder_hidden_states=text)
        else:
            h, res = block(h, emb)
        skips.extend(res)
    skips = [s + r for s, r in zip(skips, down_residuals)]
    h = unet.mid_block(h, emb, encoder_hidden_states=text) + mid_residual
    residuals = list(down_residuals)
    for block in unet.up_blocks:
        n = len(block.resnets)
        block_skips, block_res = skips[-n:], residuals[-n:]
        skips, residuals = skips[:-n], residuals[:-n]
        text_attn = getattr(block, "has_cross_attention", False)
        for j, resnet in enumerate(block.resnets):
            h = resnet(torch.cat([h, block_skips[-1 - j]], dim=1), emb)
            if text_attn:
                h = block.attentions[j](h, encoder_hidden_states=text, return_dict=False)[0]
            ctx = block_res[-1 - j]
            ctx = ctx.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H·W, C)
            h = block.pixel_attentions[j](h, encoder_hidden_states=ctx, return_dict=False)[0]
        if block.upsamplers is not None:  # nearest to the next skip's size (§2.3)
            size = tuple(skips[-1].shape[2:]) if skips else None
            for up in block.upsamplers:
                h = up(h, output_size=size)
    h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
