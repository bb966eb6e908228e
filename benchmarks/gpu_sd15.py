#!/usr/bin/env python
"""Stable Diffusion 1.5-sized LoRA training and ControlNet generation speed on a CUDA GPU.

    python benchmarks/gpu_sd15.py [--output gpu_sd15.json] [--peak_tflops 989]   # needs CUDA
    python benchmarks/gpu_sd15.py --smoke                                        # CPU, tiny, not a measurement

The UNet, VAE, CLIP text encoder and ControlNet are built from SD 1.5's published configuration with random
weights: nothing is downloaded, and speed does not depend on the weights' values. At 512 px in bf16 it measures
1. LoRA training (rank 4 on to_q/to_k/to_v/to_out.0, LoRA weights fp32 under bf16 autocast) from cached
   latents and text features: UNet forward and backward plus AdamW, images/s, and model FLOPs utilisation
   (FLOPs of one step counted by torch.utils.flop_counter, over the GPU's peak dense bf16; a frozen base
   computes no weight gradients, so a LoRA step is about twice a forward pass, not three times);
2. ControlNet generation (StableDiffusionControlNetPipeline, 25 steps, classifier-free guidance, VAE decode
   included: output_type="pt"), images/s;
3. PyTorch SDPA against xformers attention (reported "not installed" where it is absent);
4. with and without torch.compile on the UNet: compile seconds apart from steady-state throughput.
It prints a table and writes JSON with the device, versions and date. Without CUDA it says so and exits 0.
`--smoke` runs every path at a tiny size on CPU in fp32 with one or two steps, so tests exercise the code;
its figures are labelled smoke and measure nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPT = "breast ultrasound, benign lesion"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Peak dense bf16 tensor throughput (TFLOP/s, no sparsity) from the vendor's data sheets, matched in order
# against torch.cuda.get_device_name(); --peak_tflops overrides.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))

# Stable Diffusion 1.5's published configuration (runwayml/stable-diffusion-v1-5), written out here.
SD15 = {
    "resolution": 512,
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768),
    "controlnet": dict(conditioning_embedding_out_channels=(16, 32, 96, 256)),  # 8x down, as the VAE
}
# The same shapes at a size a CPU runs in seconds; the VAE halves, so the ControlNet's hint embedding does too.
SMOKE = {
    "resolution": 32,
    "unet": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=32),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=32, sample_size=32, scaling_factor=0.18215),
    "text_encoder": dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=32),
    "controlnet": dict(conditioning_embedding_out_channels=(8, 16)),
}


@dataclass
class Row:
    task: str
    attention: str
    compiled: bool
    batch: int
    status: str = "ok"
    images_per_second: float | None = None
    seconds_per_iteration: float | None = None  # a training step, or a whole generation call
    compile_seconds: float | None = None
    flops_per_iteration: float | None = None
    achieved_tflops: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------

def build_unet(config: dict, device: torch.device):
    from diffusers import UNet2DConditionModel

    with device:  # random initialisation on the device: an 860 M-parameter init is slow on a CPU
        return UNet2DConditionModel(**config["unet"])


def add_lora(unet, rank: int = 4) -> list[torch.nn.Parameter]:
    """PEFT LoRA on the attention projections; its weights are made fp32 (trained under autocast)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()
    return parameters


def build_pipeline(config: dict, device: torch.device, dtype: torch.dtype, tokenizer_dir: Path):
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from medaug.models import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_dir, [PROMPT])
    unet = build_unet(config, device)
    with device:
        controlnet = ControlNetModel.from_unet(unet, **config["controlnet"])
        vae = AutoencoderKL(**config["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"], bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             controlnet=controlnet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def set_attention(modules, backend: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    for module in modules:
        if backend == "xformers":
            module.enable_xformers_memory_efficient_attention()
        else:
            module.set_attn_processor(AttnProcessor2_0())


# ---------------------------------------------------------------------------------------------------------
# Timing and counting
# ---------------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def count_flops(function) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return float(counter.get_total_flops())


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(row: Row, iterate, device: torch.device, warmup: int, repeats: int, per_iteration: int,
            flops: float | None, peak_tflops: float | None) -> Row:
    """Fill `row` from `warmup` untimed and `repeats` timed calls of `iterate`; the first call's excess over a
    steady call is the compile time where the row is compiled."""
    reset_memory(device)
    first = timed(iterate, device)
    for _ in range(warmup - 1):
        iterate()
    seconds = sum(timed(iterate, device) for _ in range(repeats)) / repeats
    row.seconds_per_iteration = seconds
    row.images_per_second = per_iteration / seconds
    row.compile_seconds = max(0.0, first - seconds) if row.compiled else None
    row.peak_memory_gib = peak_memory_gib(device)
    if flops:
        row.flops_per_iteration = flops
        row.achieved_tflops = flops / seconds / 1e12
        row.mfu = row.achieved_tflops / peak_tflops if peak_tflops else None
    return row


def unavailable(backend: str) -> str | None:
    if backend == "xformers" and importlib.util.find_spec("xformers") is None:
        return "not installed"
    return None


# ---------------------------------------------------------------------------------------------------------
# 1. LoRA training from cached latents and text features
# ---------------------------------------------------------------------------------------------------------

def training_rows(config, device, dtype, options, variants) -> list[Row]:
    from diffusers import DDPMScheduler

    torch.manual_seed(options.seed)
    unet = build_unet(config, device).to(dtype)
    parameters = add_lora(unet)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    batch, size = options.train_batch, config["unet"]["sample_size"]
    latents = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
    hidden = torch.randn(batch, 77, config["unet"]["cross_attention_dim"], device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step(model):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = model(noisy, timesteps, hidden, return_dict=False)[0]
        F.mse_loss(prediction.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    set_attention([unet], "sdpa")
    flops = count_flops(lambda: step(unet))  # model FLOPs: the same for every backend and for compiled code
    rows = []
    for backend, compiled in variants:
        row = Row("train LoRA", backend, compiled, batch)
        rows.append(row)
        row.status = unavailable(backend) or "ok"
        if row.status != "ok":
            continue
        try:
            set_attention([unet], backend)
            model = torch.compile(unet, backend=options.compile_backend) if compiled else unet
            measure(row, lambda model=model: step(model), device, options.warmup, options.steps, batch, flops,
                    options.peak_tflops)
        except Exception as error:  # noqa: BLE001 -- one failing backend must not hide the others' figures
            row.status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return rows


# ---------------------------------------------------------------------------------------------------------
# 2. ControlNet generation with classifier-free guidance
# ---------------------------------------------------------------------------------------------------------

def generation_rows(config, device, dtype, options, variants) -> list[Row]:
    torch.manual_seed(options.seed)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = build_pipeline(config, device, dtype, Path(tokenizer_dir))
    batch, resolution = options.gen_batch, config["resolution"]
    control = torch.rand(batch, 3, resolution, resolution, device=device, dtype=dtype)
    eager_unet = pipe.unet

    def generate():
        return pipe(prompt=[PROMPT] * batch, image=control, num_inference_steps=options.inference_steps,
                    guidance_scale=options.guidance_scale, height=resolution, width=resolution, output_type="pt",
                    generator=torch.Generator(device).manual_seed(options.seed)).images

    set_attention([pipe.unet, pipe.controlnet], "sdpa")
    with torch.inference_mode():
        flops = count_flops(generate)
    rows = []
    for backend, compiled in variants:
        row = Row(f"ControlNet generate {options.inference_steps} steps, CFG", backend, compiled, batch)
        rows.append(row)
        row.status = unavailable(backend) or "ok"
        if row.status != "ok":
            continue
        try:
            set_attention([eager_unet, pipe.controlnet], backend)
            pipe.unet = torch.compile(eager_unet, backend=options.compile_backend) if compiled else eager_unet
            with torch.inference_mode():
                measure(row, generate, device, 1, options.gen_repeats, batch, flops, options.peak_tflops)
        except Exception as error:  # noqa: BLE001
            row.status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        finally:
            pipe.unet = eager_unet
    return rows


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="Timed training steps per variant.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed training steps first (compile included).")
    parser.add_argument("--gen_batch", type=int, default=4, help="Images per generation call.")
    parser.add_argument("--inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--gen_repeats", type=int, default=3, help="Timed generation calls per variant.")
    parser.add_argument("--no_compile", action="store_true", help="Skip the torch.compile variants.")
    parser.add_argument("--compile_backend", default=None,
                        help="torch.compile backend; default inductor (aot_eager with --smoke: it traces forward "
                             "and backward as inductor does, without the minutes of CPU code generation).")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="Peak dense bf16 TFLOP/s of the GPU, for MFU; default: looked up by device name.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="gpu_sd15.json")
    parser.add_argument("--smoke", action="store_true",
                        help="Every code path at a tiny size on CPU in fp32, 1-2 steps: a test, not a measurement.")
    options = parser.parse_args(argv)
    if options.smoke:
        options.train_batch, options.steps, options.warmup = 2, 1, 1
        options.gen_batch, options.inference_steps, options.gen_repeats = 1, 2, 1
    if options.compile_backend is None:
        options.compile_backend = "aot_eager" if options.smoke else "inductor"
    if options.warmup < 1:
        parser.error("--warmup must be at least 1 (the first call also holds the compile)")
    return options


def peak_for(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def print_table(results: dict) -> None:
    label = "SMOKE RUN: tiny model on CPU, fp32; these figures measure nothing" if results["smoke"] else \
        f"{results['device']}, {results['dtype']}, {results['resolution']} px, random weights"
    print(label)
    print(f"{'task':40} {'attention':9} {'compile':7} {'batch':>5} {'img/s':>8} {'s/iter':>8} {'compile s':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}  status")

    def show(value, width, spec):
        return f"{format(value, spec) if value is not None else '-':>{width}}"

    for row in results["rows"]:
        print(f"{row['task']:40} {row['attention']:9} {'yes' if row['compiled'] else 'no':7} {row['batch']:5d} "
              f"{show(row['images_per_second'], 8, '.2f')} {show(row['seconds_per_iteration'], 8, '.3f')} "
              f"{show(row['compile_seconds'], 9, '.1f')} {show(row['achieved_tflops'], 8, '.1f')} "
              f"{show(row['mfu'], 6, '.1%')} {show(row['peak_memory_gib'], 8, '.1f')}  {row['status']}")


def main(argv: list[str] | None = None) -> dict | None:
    import diffusers

    options = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # not the same "kept in float32" notice for every model cast
    if not options.smoke and not torch.cuda.is_available():
        print("gpu_sd15.py: no CUDA device here, so nothing was measured. Run it on a GPU machine "
              "(benchmarks/gpu_run.sh), or pass --smoke to exercise the code on CPU (not a measurement).")
        return None
    device = torch.device("cpu" if options.smoke else "cuda")
    dtype = torch.float32 if options.smoke else torch.bfloat16
    config = SMOKE if options.smoke else SD15
    name = f"CPU ({platform.processor() or platform.machine()})" if options.smoke else torch.cuda.get_device_name()
    if options.peak_tflops is None and not options.smoke:
        options.peak_tflops = peak_for(name)
    variants = [("sdpa", False), ("xformers", False)] + ([] if options.no_compile else [("sdpa", True)])
    rows = training_rows(config, device, dtype, options, variants)
    torch._dynamo.reset()  # compiled graphs hold the training UNet; let its memory go before generation
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += generation_rows(config, device, dtype, options, variants)
    results = {
        "smoke": options.smoke,
        "note": ("smoke run: tiny configuration on CPU in fp32, 1-2 steps; exercises the code, measures nothing"
                 if options.smoke else "random weights: speed does not depend on the weights' values"),
        "device": name, "dtype": str(dtype).removeprefix("torch."), "resolution": config["resolution"],
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "xformers": "installed" if importlib.util.find_spec("xformers") else "not installed",
        "date": time.strftime("%Y-%m-%d"), "peak_tflops": options.peak_tflops,
        "settings": {key: value for key, value in vars(options).items() if key != "output"},
        "generation_output": "output_type='pt': VAE decode included, safety checker none",
        "config": config, "rows": [asdict(row) for row in rows],
    }
    print_table(results)
    if options.peak_tflops is None and not options.smoke:
        print(f"MFU not computed: no peak bf16 figure known for '{name}'; pass --peak_tflops")
    Path(options.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
