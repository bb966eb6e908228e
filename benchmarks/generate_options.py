#!/usr/bin/env python
"""What `medaug generate`'s batch size and --compile buy on this machine, in one run.

    python benchmarks/generate_options.py [--preset small] [--images 48] [--batch_sizes 1,2,4,8,16] \
        [--baseline_batch 4] [--repeats 3] [--compile] [--output generate_options.json]

The model is generate_throughput.py's: a from-scratch base of the preset with a LoRA fine-tune (2 steps; the weights'
values do not change the cost of sampling). Every arm generates the same --images jobs from the phantom masks with
medaug's defaults (sampler, steps, precision) into a fresh folder; images/s counts sampling and writing, not loading.

- Batch size: each of --batch_sizes, and "auto" (the default, reported with what it chose), with the ratio of
  median images/s over --repeats rounds against --baseline_batch (4, medaug's default before "auto").
- --compile: the auto batch with `compile_model=True`, inductor's cache in a fresh folder so the compile is paid as
  a first run pays it. The first batch (the compile and one batch) is timed apart from the rest: steady images/s,
  its ratio against eager, and the break-even, the number of images after which the compile has paid for itself
  (compile seconds / (1/eager - 1/compiled images/s)).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def throughput_module():
    spec = importlib.util.spec_from_file_location("generate_throughput", HERE / "generate_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_generation(model_dir: Path, data: Path, output_dir: Path, images: int, batch_size, compile_model=False):
    """generate()'s summary, with each batch's finishing time so that the first batch can be told apart."""
    from medaug.generate import generate

    marks: list[tuple[float, int]] = []  # (time, images finished): the start, then one per batch
    summary = generate(model_dir, output_dir, from_masks=data, max_sources=images, batch_size=batch_size,
                       compile_model=compile_model, on_start=lambda jobs: marks.append((time.perf_counter(), 0)),
                       progress=lambda count: marks.append((time.perf_counter(), count)))
    first_seconds = marks[1][0] - marks[0][0]
    rest_images = sum(count for _, count in marks[2:])
    steady = rest_images / (marks[-1][0] - marks[1][0]) if rest_images else None
    return {"batch_size": summary["batch_size"], "batch_size_reason": summary["batch_size_reason"],
            "images": summary["written"], "seconds": summary["seconds"],
            "images_per_second": summary["images_per_second"], "first_batch_seconds": first_seconds,
            "steady_images_per_second": steady, "precision": summary["precision"], "compiled": summary["compiled"],
            "torch_threads": summary["torch_threads"]}


def batch_sweep(model_dir: Path, data: Path, work: Path, options, summarise) -> dict:
    """Every batch size once per round, --repeats rounds (the order reversed every other round); medians, by
    generate_throughput.py's `summarise`."""
    arms = [*(str(batch) for batch in options.batch_sizes), "auto"]
    runs = {arm: [] for arm in arms}
    for repeat in range(options.repeats):
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            batch = arm if arm == "auto" else int(arm)
            runs[arm].append(timed_generation(model_dir, data, work / f"batch-{arm}-{repeat}", options.images, batch))
            print(f"  round {repeat + 1}, batch {arm}: {runs[arm][-1]['images_per_second']:.2f} images/s", flush=True)
    rows = {arm: {**arm_runs[0], **summarise(arm_runs)} for arm, arm_runs in runs.items()}
    baseline = rows[str(options.baseline_batch)]["images_per_second"]
    for row in rows.values():
        row["ratio_to_baseline_batch"] = row["images_per_second"] / baseline
    return rows


def compile_comparison(model_dir: Path, data: Path, work: Path, options) -> dict:
    eager = timed_generation(model_dir, data, work / "eager", options.images, "auto")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")  # a first run's compile, not a cached one
    compiled = timed_generation(model_dir, data, work / "compiled", options.images, "auto", compile_model=True)
    batch_seconds = compiled["batch_size"] / compiled["steady_images_per_second"]
    compile_seconds = compiled["first_batch_seconds"] - batch_seconds
    saving = 1 / eager["steady_images_per_second"] - 1 / compiled["steady_images_per_second"]
    return {"eager": eager, "compiled": compiled, "compile_seconds": compile_seconds,
            "steady_ratio": compiled["steady_images_per_second"] / eager["steady_images_per_second"],
            "break_even_images": compile_seconds / saving if saving > 0 else None}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--images", type=int, default=48, help="Images per arm (phantom masks, one each).")
    parser.add_argument("--batch_sizes", default="1,2,4,8,16",
                        type=lambda text: [int(value) for value in text.split(",")])
    parser.add_argument("--baseline_batch", type=int, default=4, help="The batch the ratios are against.")
    parser.add_argument("--repeats", type=int, default=1, help="Rounds of the batch sweep; medians are reported.")
    parser.add_argument("--compile", action="store_true", help="Also time --compile (a minute or more).")
    parser.add_argument("--output", default="generate_options.json")
    options = parser.parse_args(argv)
    if options.baseline_batch not in options.batch_sizes:
        parser.error(f"--baseline_batch {options.baseline_batch} must be one of --batch_sizes")
    return options


def main(argv=None) -> dict:
    import torch

    from medaug.data import make_phantom_dataset
    from medaug.speed import choose_threads

    options = parse_args(argv)
    threads, reason = choose_threads()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "torch_threads": threads, "torch_threads_reason": reason,
               "preset": options.preset, "images": options.images, "load_average_at_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        throughput = throughput_module()
        # 70% of the phantom rows are training rows, the masks generate draws from
        data = make_phantom_dataset(work / "data", num_images=max(8, options.images * 2), size=128, seed=0)
        _, lora, _ = throughput.make_models(work, options.preset, data)
        print(f"{options.preset} at {throughput.RESOLUTION[options.preset]} px, {options.images} images per arm:")
        results["batch_sizes"] = batch_sweep(lora, data, work, options, throughput.summarise)
        if options.compile:
            results["compile"] = compile_comparison(lora, data, work, options)
    results["load_average_at_end"] = list(os.getloadavg())
    results["ratio"] = {f"batch {name}": row["ratio_to_baseline_batch"] for name, row in results["batch_sizes"].items()}
    if "compile" in results:
        results["ratio"]["compile (steady)"] = results["compile"]["steady_ratio"]
    print_results(results)
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_results(results: dict) -> None:
    print(f"{'batch':>6} {'chosen':>6} {'images/s':>9} {'vs baseline':>12}  runs")
    for name, row in results["batch_sizes"].items():
        runs = ", ".join(f"{value:.2f}" for value in row["images_per_second_runs"])
        print(f"{name:>6} {row['batch_size']:>6} {row['images_per_second']:9.2f} "
              f"{row['ratio_to_baseline_batch']:11.2f}x  {runs}")
    print(f"auto chose: {results['batch_sizes']['auto']['batch_size_reason']}")
    if "compile" in results:
        result = results["compile"]
        compiled, eager = (result[arm]["steady_images_per_second"] for arm in ("compiled", "eager"))
        print(f"compile: {result['compile_seconds']:.1f} s once; steady {compiled:.2f} vs eager {eager:.2f} images/s "
              f"({result['steady_ratio']:.2f}x); pays back after {result['break_even_images'] or float('inf'):.0f} "
              "images")


if __name__ == "__main__":
    main()
