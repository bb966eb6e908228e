"""`medaug ssl`: self-supervised pre-training under augmentation policies, scored by a linear probe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medaug.console import console, progress_bar
from medaug.outputs import output_lock
from medaug.training.arguments import COMMAND_CONFIG_HELP, config_callback


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise ValueError(f"--seeds: '{text}' is not a comma-separated list of whole numbers") from None


def ssl_command(
    data: Annotated[Path, typer.Option("--data", help="Real dataset folder: pre-training reads its training "
                                       "images only; the probe its labelled train/val rows; scores its test split.")],
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Study folder: runs/, summary.json, report.html "
                                             "(a rerun resumes it).")],
    method: Annotated[str, typer.Option("--method", help="simclr, byol, or both comma-separated.")] = "simclr,byol",
    policies: Annotated[str, typer.Option(
        "--policies", help="Comma-separated policies: crop, geometric, blur, occlusion, all, or augmentations "
                           "joined by + (crop, flip, rotation, blur, erasing, chessboard).")
                        ] = "geometric,blur,occlusion,all",
    clahe: Annotated[bool, typer.Option("--clahe/--no_clahe", help="CLAHE on every image as pre-processing.")
                     ] = False,
    label_column: Annotated[str, typer.Option("--label_column", help="Column the probe predicts.")] = "label",
    positive_label: Annotated[Optional[str], typer.Option(
        "--positive_label", help="Make the task binary: labels matching this glob (e.g. 'COVID-19*') vs the rest."
    )] = None,
    ignore_labels: Annotated[str, typer.Option(
        "--ignore_labels", help="Comma-separated labels left out of the probe (still pre-trained on), e.g. todo.")
                             ] = "",
    synthetic: Annotated[Optional[Path], typer.Option(
        "--synthetic", help="A synthetic folder whose images join the unlabelled pool in an extra arm.")] = None,
    synthetic_policies: Annotated[Optional[str], typer.Option(
        "--synthetic_policies", help="Policies of the real+synthetic arm (default: the first of --policies).")
                                  ] = None,
    allow_unknown_provenance: Annotated[bool, typer.Option(
        "--allow_unknown_provenance", help="Use synthetic rows no manifest.jsonl line vouches for; the report "
                                           "then says test-split leakage cannot be ruled out.")] = False,
    resolution: Annotated[int, typer.Option("--resolution", min=32, help="Image side in pixels.")] = 96,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Pre-training steps per encoder.")] = 300,
    supervised_steps: Annotated[int, typer.Option("--supervised_steps", min=1, help="Steps of the supervised "
                                                  "baseline.")] = 300,
    supervised_policy: Annotated[str, typer.Option("--supervised_policy", help="Augmentation policy of the "
                                                   "supervised baseline.")] = "geometric",
    batch_size: Annotated[int, typer.Option("--batch_size", min=2, help="Images per step (two views each).")] = 64,
    learning_rate: Annotated[float, typer.Option("--learning_rate", help="Peak AdamW learning rate.")] = 1e-3,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds; each run is repeated per seed.")
                     ] = "0,1,2",
    gradcam_images: Annotated[int, typer.Option("--gradcam_images", min=0, help="Test images with Grad-CAM maps "
                                                "per encoder in the report.")] = 4,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda if present).")
                      ] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", is_eager=True, callback=config_callback, help=COMMAND_CONFIG_HELP)] = None,
) -> None:
    """Train one encoder per method and policy on unlabelled images, probe it, compare with supervised."""
    import torch

    from medaug.ssl.pretrain import PretrainSettings
    from medaug.ssl.study import SslSettings, run_ssl_study

    settings = SslSettings(
        methods=_names(method), policies=policies, clahe=clahe, label_column=label_column,
        positive_label=positive_label, ignore_labels=_names(ignore_labels),
        synthetic=str(synthetic.resolve()) if synthetic else None, synthetic_policies=synthetic_policies,
        allow_unknown_provenance=allow_unknown_provenance, resolution=resolution, seeds=_seeds(seeds), supervised_policy=supervised_policy,
        supervised_steps=supervised_steps, gradcam_images=gradcam_images,
        pretrain=PretrainSettings(steps=steps, batch_size=batch_size, learning_rate=learning_rate))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with output_lock(output_dir), progress_bar("ssl") as bar:
        task = bar.add_task("runs", total=None)

        def on_run(number: int, total: int, name: str) -> None:
            bar.update(task, completed=number, total=total, description=name)

        summary = run_ssl_study(data, output_dir, settings, device, on_run)
    for method, spread in summary["spread"].items():
        console.print(f"{method}: best policy {spread['best_policy']}, AUC range over policies "
                      f"{spread['range']:.3f}")
    console.print(f"report: {output_dir / 'report.html'}")
