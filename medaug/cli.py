"""The `medaug` command. Each subcommand parses flags and calls one library function; no logic lives here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from medaug.console import console, errors, fail, progress_bar, reporting_errors
from medaug.outputs import writable_folder

app = typer.Typer(
    name="medaug",
    help="Adapt Stable Diffusion to small labelled medical image sets, generate images with masks, "
    "and measure whether they help a downstream model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
@app.command("env")
def env_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Print versions of the libraries medaug uses and what the machine offers (CUDA, bf16, xformers)."""
    from medaug.env import environment_report

    report = environment_report()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(show_header=False, box=None)
    for name, version in report["packages"].items():
        table.add_row(name, version or "[red]not installed[/]")
    for key in ("python", "platform", "cuda_available", "cuda_version", "gpus", "bf16_supported",
                "sdpa_available", "xformers_installed", "xformers_version", "cpu_threads", "usable_cores",
                "medaug_threads", "medaug_threads_reason", "cpu_bf16_native", "generate_precision_cpu",
                "train_attention_cpu"):
        table.add_row(key, str(report[key]))
    console.print(table)


@app.command("inspect")
def inspect_command(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset folder with metadata.csv or metadata.jsonl.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Check one split only (train, val, test).")] = None,
    skip_images: Annotated[bool, typer.Option("--skip_images", help="Check paths only; do not decode files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Validate a dataset folder and summarise it; exit 1 listing every problem found."""
    from medaug.data import DatasetError, DatasetFolder, summarize

    try:
        folder = DatasetFolder(dataset_dir)
    except DatasetError as error:
        fail(str(error))
    with progress_bar("checking", disable=as_json) as progress:
        task = progress.add_task("rows", total=len(folder))
        scan = folder.scan(split=split, read_images=not skip_images,
                           progress=lambda n: progress.advance(task, n))
    summary = summarize(folder, scan)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if scan.problems:
        raise typer.Exit(code=1)


def _print_summary(summary: dict) -> None:
    table = Table(title=f"{summary['dataset']} ({summary['metadata']})", show_header=False)
    table.add_row("rows", str(summary["rows"]))
    table.add_row("splits", ", ".join(f"{k}: {v}" for k, v in summary["splits"].items()))
    for label, counts in summary["labels"].items():
        table.add_row(f"label {label}", ", ".join(f"{k}: {v}" for k, v in counts.items()))
    table.add_row("with text", str(summary["with_text"]))
    table.add_row("with mask", str(summary["with_mask"]))
    if summary["with_conditioning_image"]:
        table.add_row("with edge map", str(summary["with_conditioning_image"]))
    sizes = summary["image_sizes"]
    if sizes:
        table.add_row("width (px)", f"{sizes['width'][0]}..{sizes['width'][1]}")
        table.add_row("height (px)", f"{sizes['height'][0]}..{sizes['height'][1]}")
        table.add_row("most common sizes", ", ".join(sizes["most_common"]))
    for kind, count in summary["pixel_types"].items():
        table.add_row("pixels", f"{kind}: {count}")
    coverage = summary["mask_coverage"]
    if coverage:
        table.add_row("mask coverage", f"mean {coverage['mean']:.1%}, median {coverage['median']:.1%}, "
                      f"max {coverage['max']:.1%}; {coverage['empty']} of {coverage['masks_read']} empty")
    console.print(table)
    for notice in summary["notices"]:
        console.print(f"[yellow]note:[/] {escape(notice)}", highlight=False, soft_wrap=True)
    problems = summary["problems"]
    if problems:
        errors.print(f"[bold red]{len(problems)} problem(s):[/]")
        for problem in problems:
            errors.print(f"  - {problem}", highlight=False, soft_wrap=True)
    else:
        console.print("[green]no problems found[/]")


@app.command("init-model")
def init_model_command(
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Folder to write the model into.")],
    preset: Annotated[str, typer.Option("--preset", help="Model size: tiny (tests, 64 px) or small "
                                        "(CPU demos, GPU studies at 128-256 px).")] = "tiny",
    prompts_from: Annotated[Optional[Path], typer.Option(
        "--prompts_from", help="Dataset folder whose `text` column adds words to the tokenizer.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the random initial weights.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model already in --output_dir.")] = False,
) -> None:
    """Write a from-scratch Stable Diffusion folder (random weights) that diffusers loads offline."""
    from medaug.data import DatasetError, DatasetFolder
    from medaug.models import PRESETS, init_model

    if preset not in PRESETS:
        fail(f"--preset: unknown preset '{preset}'; expected one of {', '.join(PRESETS)}")
    writable_folder(output_dir)
    prompts = None
    if prompts_from is not None:
        try:
            folder = DatasetFolder(prompts_from)
        except DatasetError as error:
            fail(f"--prompts_from: {error}")
        prompts = [folder.value(i, "text") for i in range(len(folder))]
    try:
        description = init_model(output_dir, preset=preset, prompts=prompts, seed=seed, overwrite=overwrite)
    except FileExistsError as error:
        fail(f"--output_dir: {error}")
    table = Table(title=f"{preset} model written to {output_dir}")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    for name, count in description["parameters"].items():
        table.add_row(name, f"{count:,}")
    table.add_row("tokenizer (vocabulary)", f"{description['vocabulary_size']:,}")
    console.print(table)
    console.print(f"resolution {description['resolution']} px; the VAE downsamples "
                  f"{description['vae_scale_factor']}x. Weights are random: train before generating.")


@app.command("phantom")
def phantom_command(
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Folder to write the dataset into.")],
    num_images: Annotated[int, typer.Option("--num_images", min=2, help="How many images to make.")] = 40,
    size: Annotated[int, typer.Option("--size", min=32, help="Image side in pixels.")] = 96,
    seed: Annotated[int, typer.Option("--seed", help="Seed for shapes, places and speckle.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write over a dataset already there.")] = False,
) -> None:
    """Write a small ultrasound-like phantom dataset (images, lesion masks, metadata.csv); no downloads."""
    from medaug.data import make_phantom_dataset

    writable_folder(output_dir)
    if (output_dir / "metadata.csv").exists() and not overwrite:
        fail(f"--output_dir: {output_dir} already holds a dataset; choose another folder or pass --overwrite")
    make_phantom_dataset(output_dir, num_images=num_images, size=size, seed=seed)
    console.print(f"wrote {num_images} phantom images with masks to {output_dir}")


from medaug.commands.evaluate import evaluate_command  # noqa: E402
from medaug.commands.train_encoder import train_encoder_command  # noqa: E402

app.command("evaluate")(evaluate_command)
app.command("train-encoder")(train_encoder_command)

from medaug.commands.bench import bench_command  # noqa: E402
app.command("bench")(bench_command)

from medaug.commands.embed import embed_command  # noqa: E402
app.command("embed")(embed_command)

from medaug.commands.edges import edges_command  # noqa: E402
app.command("edges")(edges_command)

from medaug.commands.export import export_command  # noqa: E402
app.command("export")(export_command)

from medaug.commands.patches import patches_command  # noqa: E402
app.command("patches")(patches_command)

from medaug.commands.demo import demo_command  # noqa: E402
app.command("demo")(demo_command)

from medaug.commands.generate import generate_command  # noqa: E402
app.command("generate")(generate_command)

from medaug.commands.ssl import ssl_command  # noqa: E402
app.command("ssl")(ssl_command)

from medaug.commands.study import study_app  # noqa: E402
app.add_typer(study_app, name="study")


def main(argv: list[str] | None = None) -> None:
    """The `medaug` command: expected failures anywhere below end as one `error:` line and exit status 2."""
    with reporting_errors():
        app(args=argv, prog_name="medaug")


if __name__ == "__main__":  # pragma: no cover
    main()
