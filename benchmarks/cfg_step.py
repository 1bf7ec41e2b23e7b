"""One classifier-free-guidance step: our ControlNet + PASD UNet vs diffusers' ControlNet + UNet.

A step is what the sampler runs per denoising step: the ControlNet and the UNet on a batch of 2
latents (negative and positive prompt) of `--latent`² with a 77-token context, SD1.5-size random
weights, float32. Ours is the PASD ControlNet feeding the PASD UNet (with PACA); its DR net depends
on the LQ image alone, so our sampler runs it once per image before the steps (`--dr-net hoisted`,
the default: its one-image time and FLOPs are printed apart) and `--dr-net step` puts it back in
every step. diffusers' is the stock `ControlNetModel.from_unet` + `UNet2DConditionModel` as its
pipeline runs it (conditioning stem in every step), which does fewer FLOPs (no PACA);
`--family stock` runs our stock UNet instead, the same network as diffusers'; `--torch pasd` gives
the PyTorch side the PASD UNet too (`torch_pasd.py`: PACA added to diffusers' UNet, checked against
ours by a test), the same network in both frameworks. Each framework runs in its own child process, one
after the other, so `ru_maxrss` is that framework's peak resident memory; a watchdog kills a
child when the machine's available memory falls below `--min-free-gb`. Prints compile (JAX) or
first-call time, the median step time of `--repeats`, counted FLOPs (`pasd_jax.perf`), FLOP/s,
MFU where the device has a known peak, and peak RSS; the last line is one JSON object.

    python benchmarks/cfg_step.py --latent 32                 # both frameworks
    python benchmarks/cfg_step.py --latent 64 --only jax --attention xla   # A/B the attention kernel
    python benchmarks/cfg_step.py --latent 32 --family stock   # same network as diffusers'
    python benchmarks/cfg_step.py --latent 64 --torch pasd     # PASD UNet in both frameworks
    python benchmarks/cfg_step.py --latent 32 --rrdb --dr-net step --only jax   # the DR net per step
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _timed(run, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _device_params(config: dict, seed: int) -> dict:
    """Random float32 weights N(0, 1/fan_in) (biases 0, norm scales 1) made leaf by leaf on the
    device, so the host never holds more than one leaf (`assembly.init.init_params` builds the whole numpy
    tree first, in float64 per leaf: +1–3 GiB of transient peak RSS at SD1.5 size)."""
    import jax
    import numpy as np

    from pasd_jax.assembly import registry

    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = getattr(path[-1], "key", str(path[-1]))
        if name in ("bias", "scale"):
            return jax.device_put(np.full(spec.shape, 1.0 if name == "scale" else 0.0, np.float32))
        fan_in = int(np.prod(spec.shape[:-1])) if name == "kernel" else spec.shape[-1]
        x = rng.standard_normal(spec.shape, dtype=np.float32)
        x *= np.float32(1.0 / np.sqrt(max(fan_in, 1)))
        return jax.device_put(x)

    return jax.tree_util.tree_map_with_path(leaf, registry.abstract_params(registry.build_module(config)))


def child_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pasd_jax.assembly import registry
    from pasd_jax.fixtures import sd15
    from pasd_jax.perf import model_flops

    cfgs = sd15.configs(args.family, use_rrdb=args.rrdb)
    unet, controlnet = registry.build_module(cfgs["unet"]), registry.build_module(cfgs["controlnet"])
    params = {"unet": _device_params(cfgs["unet"], 0), "controlnet": _device_params(cfgs["controlnet"], 1)}
    rng = np.random.default_rng(0)
    b, lat = 2, args.latent
    x = jnp.asarray(rng.standard_normal((b, lat, lat, 4)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((b, 77, 768)), jnp.float32)
    cond = jnp.asarray(rng.random((b, 8 * lat, 8 * lat, 3)), jnp.float32)
    t = jnp.full((b,), 500, jnp.int32)

    def embed(p, cond):  # the DR net: the sampler runs it once per image, before its steps
        return controlnet.apply({"params": p["controlnet"]}, cond, method=controlnet.embed_condition)

    def step(p, x, t, text, cond_or_feature):
        kw = {"cond_feature": cond_or_feature} if args.dr_net == "hoisted" else {}
        _, down, mid = controlnet.apply({"params": p["controlnet"]}, x, t, text,
                                        None if kw else cond_or_feature, **kw)
        return unet.apply({"params": p["unet"]}, x, t, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)

    dr_s = dr_flops = None
    if args.dr_net == "hoisted":  # one image's feature, repeated for the CFG pair as the sampler does
        embed_c = jax.jit(embed).lower(params, cond[:1]).compile()
        _, dr_s = _timed(lambda: embed_c(params, cond[:1]).block_until_ready(), args.repeats)
        dr_flops = model_flops.count(embed, params, cond[:1])
        step_in = jnp.repeat(embed_c(params, cond[:1]), b, 0)
    else:
        step_in = cond
    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, x, t, text, step_in).compile()
    compile_s = time.perf_counter() - start
    first, steady = _timed(lambda: compiled(params, x, t, text, step_in).block_until_ready(), args.repeats)
    flops = model_flops.count(step, params, x, t, text, step_in)
    ma = compiled.memory_analysis()
    what = f"PASD ControlNet{' (RRDB)' if args.rrdb else ''} + {args.family} UNet, DR net {args.dr_net}"
    return {"framework": "pasd-jax", "what": what, "compile_s": compile_s,
            "first_s": first, "step_s": steady, "flops": flops, "peak_rss_gb": _peak_rss_gb(),
            "weights_gb": sum(a.nbytes for a in jax.tree_util.tree_leaves(params)) / 2**30,
            "xla_temp_gb": ma.temp_size_in_bytes / 2**30 if ma else None, "dr_net": args.dr_net,
            "dr_net_s_per_image": dr_s, "dr_net_flops_per_image": dr_flops,
            "attention": os.environ.get("PASD_JAX_ATTENTION", "auto"), "device": jax.devices()[0].device_kind}


def child_torch(args) -> dict:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    import torch_pasd
    from pasd_jax.fixtures import diffusers_kwargs, sd15

    config = diffusers_kwargs(sd15.configs("stock")["unet"])
    pasd = args.torch == "pasd"
    b, lat = 2, args.latent

    def build():
        unet = UNet2DConditionModel(**config)
        controlnet = ControlNetModel.from_unet(unet)
        if pasd:  # PACA in the up blocks (the PASD UNet); the ControlNet keeps diffusers' stem
            torch_pasd.add_pixel_attentions(unet)
        return unet, controlnet

    def forward(unet, controlnet, x, t, text, cond):
        down, mid = controlnet(x, t, text, cond, return_dict=False)
        if pasd:
            return torch_pasd.pasd_unet_forward(unet, x, t, text, down, mid)
        return unet(x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    with torch.device("meta"):  # FLOPs on shapes only; the bmm processor so torch counts attention too
        unet_m, cn_m = build()
        for m in (unet_m, cn_m):
            m.set_attn_processor(AttnProcessor())
        with FlopCounterMode(display=False) as counter:
            forward(unet_m, cn_m, torch.zeros(b, 4, lat, lat), torch.full((b,), 500), torch.zeros(b, 77, 768),
                    torch.zeros(b, 3, 8 * lat, 8 * lat))
    flops = counter.get_total_flops()
    del unet_m, cn_m
    torch.manual_seed(0)
    unet, controlnet = (m.eval() for m in build())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, lat, lat, generator=gen)
    text = torch.randn(b, 77, 768, generator=gen)
    cond = torch.rand(b, 3, 8 * lat, 8 * lat, generator=gen)
    t = torch.full((b,), 500)

    def run():
        with torch.inference_mode():
            forward(unet, controlnet, x, t, text, cond)

    first, steady = _timed(run, args.repeats)
    what = ("stock ControlNet + PASD UNet (torch_pasd.py)" if pasd else "stock ControlNet + UNet")
    return {"framework": "diffusers", "what": what, "compile_s": None, "first_s": first,
            "step_s": steady, "flops": flops, "peak_rss_gb": _peak_rss_gb(), "threads": torch.get_num_threads(),
            "weights_gb": sum(p.numel() * p.element_size() for m in (unet, controlnet) for p in m.parameters()) / 2**30,
            "device": "cpu"}


def _run_child(which: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--child", which, "--latent", str(args.latent), "--repeats", str(args.repeats),
           "--family", args.family, "--dr-net", args.dr_net, "--torch", args.torch] + (["--rrdb"] if args.rrdb else [])
    env = dict(os.environ)
    if args.attention:
        env["PASD_JAX_ATTENTION"] = args.attention
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    while proc.poll() is None:
        if _mem_available_gb() < args.min_free_gb:
            proc.kill()
            proc.wait()
            print(f"{which}: killed, the machine's available memory fell below {args.min_free_gb} GiB", flush=True)
            return None
        time.sleep(0.2)
    lines = proc.stdout.read().strip().splitlines()
    if proc.returncode or not lines:
        print(f"{which}: child failed (exit {proc.returncode})", flush=True)
        return None
    return json.loads(lines[-1])


def _report(r: dict, which: str, args, top, prefix: str = "") -> None:
    from pasd_jax.perf import peak

    comp = f"compile {r['compile_s']:.1f} s, " if r["compile_s"] is not None else ""
    extra = f", attention {r['attention']}" if which == "jax" else f", {r['threads']} threads"
    if which == "jax" and r.get("dr_net_s_per_image") is not None:
        extra += (f"; DR net once per image: {r['dr_net_s_per_image']:.3f} s, "
                  f"{r['dr_net_flops_per_image'] / 1e9:.1f} GFLOP (not in the step)")
    print(f"{prefix}{r['framework']:9s} {r['what']}: {comp}first {r['first_s']:.2f} s, step {r['step_s']:.3f} s "
          f"(median of {args.repeats}), {r['flops'] / 1e9:.0f} GFLOP, {peak.describe(r['flops'], r['step_s'], top)}, "
          f"peak RSS {r['peak_rss_gb']:.2f} GiB (weights {r['weights_gb']:.2f} GiB, "
          f"the rest {r['peak_rss_gb'] - r['weights_gb']:.2f} GiB){extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=32, help="latent side (image side 8×)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--family", choices=("pasd", "pasd_light", "stock"), default="pasd",
                    help="our UNet family (stock: the same network as diffusers', a framework-only comparison)")
    ap.add_argument("--rrdb", action="store_true", help="the DR net with its two RRDBs (the *_rrdb releases)")
    ap.add_argument("--dr-net", choices=("hoisted", "step"), default="hoisted",
                    help="hoisted: the step gets the DR-net feature computed once per image, as our sampler "
                         "runs it (its cost is printed apart); step: the DR net inside every step")
    ap.add_argument("--torch", choices=("stock", "pasd"), default="stock",
                    help="the PyTorch side: stock (diffusers' ControlNet + UNet, the issue's baseline) or "
                         "pasd (the same ControlNet + the PASD UNet with PACA of benchmarks/torch_pasd.py: "
                         "the same network as ours, in PyTorch)")
    ap.add_argument("--only", choices=("jax", "torch"), default=None)
    ap.add_argument("--attention", choices=("auto", "xla", "chunked"), default=None,
                    help="PASD_JAX_ATTENTION for the JAX child (default: its environment, else auto)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the frameworks alternately this many times (a noisy machine: the ratio of the "
                         "medians and every round's own ratio are printed)")
    ap.add_argument("--min-free-gb", type=float, default=2.0)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one chip (default: table)")
    ap.add_argument("--child", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        ap.error("--rounds and --repeats must be at least 1")
    if args.child:
        print(json.dumps((child_jax if args.child == "jax" else child_torch)(args)), flush=True)
        return
    from pasd_jax.perf import peak

    top = peak.peak_tflops(override=args.peak_tflops, dtype="float32")
    print(f"one CFG step (batch 2), latent {args.latent}², SD1.5-size random weights, float32", flush=True)
    results, rounds = {}, []
    for rnd in range(args.rounds):
        this = {}
        for which in ([args.only] if args.only else ["jax", "torch"]):
            r = _run_child(which, args)
            if r is None:
                continue
            this[which] = r
            _report(r, which, args, top, f"round {rnd + 1}: " if args.rounds > 1 else "")
        rounds.append(this)
    for which in ("jax", "torch"):
        runs = [r[which] for r in rounds if which in r]
        if runs:
            results[which] = dict(runs[-1], step_s=statistics.median(r["step_s"] for r in runs),
                                  step_s_rounds=[r["step_s"] for r in runs],
                                  peak_rss_gb=max(r["peak_rss_gb"] for r in runs))
    if len(results) == 2:
        ratio = results["jax"]["step_s"] / results["torch"]["step_s"]
        per_round = [r["jax"]["step_s"] / r["torch"]["step_s"] for r in rounds if len(r) == 2]
        rest = lambda r: r["peak_rss_gb"] - r["weights_gb"]  # noqa: E731
        each = f" (rounds: {', '.join(f'{x:.2f}' for x in per_round)})" if len(per_round) > 1 else ""
        print(f"time ratio pasd-jax / diffusers: {ratio:.2f}{each}; memory ratio "
              f"{results['jax']['peak_rss_gb'] / results['torch']['peak_rss_gb']:.2f} "
              f"(beyond the weights: {rest(results['jax']) / rest(results['torch']):.2f})", flush=True)
    print(json.dumps({"latent": args.latent, **{k: v for k, v in results.items()}}))
    sys.exit(0 if results else 1)


if __name__ == "__main__":
    main()
