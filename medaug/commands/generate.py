"""`medaug generate`: a synthetic dataset folder (images, masks, metadata.csv, manifest.jsonl) from a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medaug.console import console, fail, progress_bar
from medaug.speed import DEFAULT_SCHEDULER, DEFAULT_STEPS, PRECISIONS
from medaug.training.arguments import COMMAND_CONFIG_HELP, config_callback


def generate_command(
    output_dir: Annotated[Path, typer.Option(
        "--output_dir", help="Synthetic folder to write: images/, masks/, metadata.csv, manifest.jsonl.")],
    model_dir: Annotated[Optional[Path], typer.Option(
        "--model_dir", help="Output folder of finetune.py or train_controlnet.py (medaug_args.json and weights); "
                            "or give --base_model with --lora_weights and/or --controlnet.")] = None,
    edges: Annotated[Optional[Path], typer.Option(
        "--edges", help="Edge maps to follow: a dataset folder naming them in conditioning_image_file_name (as "
                        "`medaug edges` writes), or a plain folder of edge images at the output size.")] = None,
    from_masks: Annotated[Optional[Path], typer.Option(
        "--from_masks", help="Dataset folder whose masks give edge maps (the model's mask edge method, else "
                             "mask_boundary); each image carries its row's mask.")] = None,
    from_images: Annotated[Optional[Path], typer.Option(
        "--from_images", help="Dataset folder whose images give edge maps (the model's edge method, else "
                              "canny); masks are carried where rows have them.")] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", help="Prompt for every image (text models); default: each source row's text.")] = None,
    embeddings_file: Annotated[Optional[Path], typer.Option(
        "--embeddings_file", help="Embeddings keyed by the source rows' file_name (embedding models); "
                                  "default: the file the model was trained with.")] = None,
    split: Annotated[str, typer.Option("--split", help="Rows of this split of the source give the images.")
                     ] = "train",
    num_per_source: Annotated[int, typer.Option("--num_per_source", min=1, help="Images per source row.")] = 1,
    num_inference_steps: Annotated[int, typer.Option(
        "--num_inference_steps", min=1, help="Denoising steps (the default sampler's quality at this count matched "
                                             "20 DDIM steps: benchmarks/RESULTS.md).")] = DEFAULT_STEPS,
    guidance_scale: Annotated[float, typer.Option(
        "--guidance_scale", help="Classifier-free guidance; 1 turns it off.")] = 3.0,
    controlnet_conditioning_scale: Annotated[float, typer.Option(
        "--controlnet_conditioning_scale", help="How strongly the edge map steers (ControlNet models).")] = 1.0,
    scheduler: Annotated[str, typer.Option(
        "--scheduler", help="ddim, ddpm, pndm, euler, euler_a, dpm++, unipc, lms or heun.")] = DEFAULT_SCHEDULER,
    precision: Annotated[str, typer.Option(
        "--precision", help=f"{', '.join(PRECISIONS)}. auto: bf16 autocast where the device computes bf16 natively "
                            "(CUDA, or a CPU with AVX512-BF16/AMX), else fp32; `medaug env` shows the choice.")
                         ] = "auto",
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="Compile the UNet (and ControlNet) with torch.compile: about a minute before the first "
                          "image, then 1.4-1.6x faster sampling on a CPU, so it pays back after ~600-850 images of "
                          "the small preset at 128 px there (benchmarks/RESULTS.md). Latent diffusion models only.")
                         ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Each image's seed derives from this and its job.")] = 0,
    batch_size: Annotated[str, typer.Option(
        "--batch_size", help="Images per denoising batch, or auto: the largest that fits the memory free once the "
                             "model is loaded, up to 8 on a CPU (where images/s stop rising) and 16 on CUDA; "
                             "the summary says what was chosen.")] = "auto",
    resolution: Annotated[Optional[int], typer.Option(
        "--resolution", help="Output size in pixels; default: the model's training resolution.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue a folder with more --num_per_source or --max_sources than it was made with "
                         "(a rerun with the same arguments always continues).")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Remove what an earlier generate run wrote in --output_dir and start again.")] = False,
    max_sources: Annotated[Optional[int], typer.Option(
        "--max_sources", min=1, help="Use only the first N source rows (debugging).")] = None,
    base_model: Annotated[Optional[str], typer.Option(
        "--base_model", help="Where the run's base model is now (a folder or a Hub name), when it moved since "
                             "training; default: what the run folder records. Without --model_dir: the base "
                             "that --lora_weights and --controlnet were trained on.")] = None,
    lora_weights: Annotated[Optional[Path], typer.Option(
        "--lora_weights", help="A LoRA trained elsewhere, as the .safetensors file diffusers' save_lora_weights "
                               "writes (or any format load_lora_weights reads); with --base_model, no --model_dir."
                               )] = None,
    controlnet: Annotated[Optional[Path], typer.Option(
        "--controlnet", help="A ControlNet trained elsewhere: the folder ControlNetModel.save_pretrained writes; "
                             "with --base_model, no --model_dir.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", is_eager=True, callback=config_callback, help=COMMAND_CONFIG_HELP)] = None,
) -> None:
    """Generate images (with the masks they were made for) into a dataset folder with a provenance manifest.

    Run under `accelerate launch --num_processes N -m medaug.cli generate ...` to split the images over
    processes; a killed run continues where it stopped when rerun with the same arguments.
    """
    from medaug.generate import generate, process_state

    if overwrite and resume:
        fail("--resume and --overwrite contradict each other; give one")
    main_process = process_state().is_main_process  # under accelerate launch, one bar and one summary
    with progress_bar("generating", disable=not main_process) as bar:
        task = bar.add_task("images", total=None)
        try:
            summary = generate(
                model_dir, output_dir, edges=edges, from_masks=from_masks, from_images=from_images, prompt=prompt,
                embeddings_file=embeddings_file, split=split, num_per_source=num_per_source,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                controlnet_conditioning_scale=controlnet_conditioning_scale, scheduler=scheduler, seed=seed,
                batch_size=batch_size, resolution=resolution, resume=resume, overwrite=overwrite,
                max_sources=max_sources, base_model=base_model, lora_weights=lora_weights, controlnet=controlnet,
                precision=precision, compile_model=compile_model, on_start=lambda jobs: bar.update(task, total=jobs),
                progress=lambda n: bar.advance(task, n))
        except (ValueError, FileNotFoundError, FileExistsError) as error:  # DatasetError, EmbeddingError too
            fail(str(error))
    if main_process:
        console.print(f"wrote {summary['written']} images to {summary['output_dir']} "
                      f"({summary['skipped']} already there, {summary['total']} in all) in "
                      f"{summary['seconds']:.1f} s: {summary['images_per_second']:.2f} images/s "
                      f"over {summary['processes']} process(es), batches of {summary['batch_size']} "
                      f"({summary['batch_size_reason']}), {summary['precision']}"
                      f"{', compiled' if summary['compiled'] else ''}, "
                      f"{summary['torch_threads']} torch thread(s) ({summary['torch_threads_reason']})", soft_wrap=True)
