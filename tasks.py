"""The command line: `invoke --list` shows every task, `invoke --help TASK` its flags.

Tasks are thin: the work lives in the stage packages (lwgan_models, compile, targets, bench,
reports), so everything here is also callable from Python and tested there.
"""

from __future__ import annotations

import functools
import sys
import time
import traceback
from pathlib import Path

from invoke import Collection, Exit, task

from errors import UserError

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_REPORT = REPO_ROOT / "reports" / "index.html"


def say(message: str) -> None:
    print(message, flush=True)


def cli(func):
    """Bad input ends the command with one line on stderr (exit 1); `--debug` shows the traceback."""

    @functools.wraps(func)
    def wrapper(c, *args, **kwargs):
        try:
            return func(c, *args, **kwargs)
        except UserError as exc:
            if kwargs.get("debug"):
                traceback.print_exc()
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise Exit(code=1) from None

    return wrapper


def _models_under_test(model: str | None, onnx: str | None, shape: str | None, checkpoint: str | None,
                       demo_only: bool):
    """Registry models and variants by name (default: the demo set and its compressed variants) or one
    ONNX file, all checked before any work."""
    import lwgan_models
    from compile.pipeline import from_onnx_file, from_registry, from_variant
    from lwgan_models.registry import VARIANT_SEPARATOR, find_variant, variants

    input_shape = _shape(shape) if shape else None
    if onnx:
        if model or checkpoint:
            raise UserError("--onnx benchmarks one file; it takes no --model or --checkpoint")
        return [from_onnx_file(onnx, input_shape)]
    if model:
        names = [m.strip() for m in model.split(",") if m.strip()]
    else:
        bases = [n for n in lwgan_models.names() if lwgan_models.get(n).demo or not demo_only]
        names = [name for base in bases for name in (base, *variants(base))]
    chosen = {name: find_variant(name) if VARIANT_SEPARATOR in name else lwgan_models.get(name) for name in names}
    if checkpoint and (len(names) != 1 or VARIANT_SEPARATOR in names[0]):
        raise UserError(f"--checkpoint {checkpoint} needs exactly one base --model, got {', '.join(names)}")
    return [
        from_variant(found, input_shape) if VARIANT_SEPARATOR in name
        else from_registry(lwgan_models.load(name, checkpoint), input_shape)
        for name, found in chosen.items()
    ]


def _count(value, flag: str, default: int) -> int:
    """A positive whole number from a flag (invoke passes untyped flags as strings)."""
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise UserError(f"--{flag} {value!r}: expected a positive whole number")
    return number


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--shape {text!r}: expected NxCxHxW, e.g. 1x3x256x256") from None


def _target(target: str, isa: str | None):
    import targets

    return targets.resolve(targets.load_target(target), isa)


@task(
    help={
        "target": "device config name under targets/ (e.g. host)",
        "model": "registry model name, or several separated by commas",
        "onnx": "an ONNX generator file to tune instead of a registry model",
        "shape": "input shape NxCxHxW (default: the model's)",
        "trials": "total MetaSchedule trials (default: the target's tuning budget)",
        "trials_per_task": "trials per tuning task (default: the target's)",
        "isa": "ISA level of the target to tune for (default: detected)",
        "debug": "show tracebacks",
    }
)
@cli
def tune(c, model=None, onnx=None, target="host", shape=None, trials=None, trials_per_task=None, isa=None, debug=False):
    """Tune with MetaSchedule (XGBoost cost model); appends to autotune_logs/<target-level>/<model>/."""
    from compile.pipeline import database_of, tune_for_target

    resolved = _target(target, isa)
    budget = _count(trials, "trials", resolved.config.tuning_trials)
    per_task = _count(trials_per_task, "trials-per-task", resolved.config.tuning_trials_per_task)
    if not (model or onnx):
        raise UserError("say what to tune: --model NAME or --onnx FILE")
    for subject in _models_under_test(model, onnx, shape, checkpoint=None, demo_only=False):
        database = database_of(subject, resolved)
        say(f"{subject.name}: {database.record_count()} records so far in {database.path}")
        started = time.time()
        ran = tune_for_target(subject, resolved, budget, per_task, report=say)
        say(f"{subject.name}: {ran} trials in {time.time() - started:.0f} s; "
            f"database now has {database.record_count()} records")


@task(
    help={
        "target": "device config name under targets/ (e.g. host)",
        "model": "registry model name(s), comma separated (default: the demo set)",
        "onnx": "an ONNX generator file (one image input) to benchmark instead (TVM vs ONNX Runtime)",
        "runtimes": "comma-separated runtimes: tvm,torch,onnxruntime",
        "samples": "timed samples per runtime (default: the target's rule)",
        "threads": "threads for every runtime (default: the target's)",
        "isa": "ISA level (default: detected)",
        "all_models": "every registered model, not just the demo set",
        "shape": "input shape NxCxHxW instead of each model's default, e.g. 1x3x256x256",
        "results": "folder for the records (default: reports/results)",
        "checkpoint": "weights to load instead of the registry's (one model only), e.g. an official latest_net_G_A.pth",
        "debug": "show tracebacks",
    }
)
@cli
def bench(c, target="host", model=None, onnx=None, runtimes="tvm,torch,onnxruntime", samples=None, threads=None, isa=None,
          all_models=False, shape=None, results=None, checkpoint=None, debug=False):
    """Benchmark models side by side; appends records to reports/results/<run-id>.jsonl."""
    import dataclasses

    from bench.record import RESULTS_DIR, append_records
    from bench.run import bench_model, new_run_id

    resolved = _target(target, isa)
    rules = resolved.config.bench
    rules = dataclasses.replace(
        rules, samples=_count(samples, "samples", rules.samples), threads=_count(threads, "threads", rules.threads)
    )
    subjects = _models_under_test(model, onnx, shape, checkpoint, demo_only=not all_models)
    run_id = new_run_id()
    out = (Path(results) if results else RESULTS_DIR) / f"{run_id}.jsonl"
    say(f"run {run_id}: {len(subjects)} model(s) on {resolved.config.label} [{resolved.db_key}], {rules.threads} threads")
    failed = []
    for index, subject in enumerate(subjects, 1):
        say(f"[{index}/{len(subjects)}] {subject.name}")
        records = bench_model(subject, resolved, run_id, tuple(r.strip() for r in runtimes.split(",")), rules, say,
                              samples_dir=out.parent / f"{run_id}.samples")
        append_records(records, out)  # per model, so an interruption keeps what was measured
        failed += [r for r in records if not r.valid]
    say(f"records: {out}")
    if any(r.beyond_tolerance() for r in failed):
        raise Exit("error: some outputs differ from the reference beyond tolerance (records kept, marked invalid)", code=2)


@task(
    help={
        "model": "registry model to train (its architecture; e.g. cyclegan-resnet6-ngf16, nst-cin4-w16)",
        "epochs": "CycleGAN: epochs at the full learning rate, then as many decaying to 0 (default 100 + 100)",
        "steps": "style transfer: training steps (default 4000)",
        "crop": "training crop size in pixels (default: the recipe's, 128)",
        "dataroot": "CycleGAN: folder with trainA/trainB/testA/testB (default: the shipped stand-in dataset)",
        "out": "checkpoint to write (default lwgan_models/checkpoints/<model>.pt; never overwritten)",
        "threads": "torch threads (default: torch's choice; 1 is fastest on a busy 2-core machine)",
        "debug": "show tracebacks",
    }
)
@cli
def train(c, model, epochs=None, steps=None, crop=None, dataroot=None, out=None, threads=None, debug=False):
    """Train a generator with its recipe (CycleGAN or fast style transfer); resumes an interrupted run."""
    import torch

    import lwgan_models
    from lwgan_models.compression.compress import evaluate_base
    from lwgan_models.registry import CHECKPOINT_DIR
    from lwgan_models.training import RUNS_DIR

    spec = lwgan_models.get(model)
    checkpoint = Path(out) if out else CHECKPOINT_DIR / f"{spec.name}.pt"
    work_dir = RUNS_DIR / checkpoint.stem
    if threads:
        torch.set_num_threads(_count(threads, "threads", 0))
    crop_size = {"crop_size": _count(crop, "crop", 0)} if crop else {}
    if spec.arch["family"] == "cyclegan":
        from lwgan_models.cyclegan_recipe import CycleGANConfig, train_cyclegan

        if steps:
            raise UserError("--steps is for style transfer; CycleGAN trains for --epochs")

        half = _count(epochs, "epochs", 100)
        # upstream loads 286 px and crops 256; keep that ratio at other crop sizes
        load_size = {"load_size": round(crop_size["crop_size"] * 286 / 256)} if crop_size else {}
        config = CycleGANConfig(netG=spec.arch["netG"], ngf=spec.arch["ngf"], n_epochs=half, n_epochs_decay=half,
                                **({"dataroot": Path(dataroot)} if dataroot else {}), **crop_size, **load_size)
        train_cyclegan(config, checkpoint, work_dir)
    else:
        from lwgan_models.nst_recipes import NSTConfig, train_fast_nst

        if dataroot or epochs:
            raise UserError("--dataroot and --epochs are for CycleGAN; style transfer trains for --steps "
                            "on the stand-in photos")
        config = NSTConfig(width=spec.arch["width"], n_styles=spec.arch["n_styles"],
                           **({"steps": _count(steps, "steps", 0)} if steps else {}), **crop_size)
        train_fast_nst(config, checkpoint, work_dir)
    metric = evaluate_base(lwgan_models.load(spec, checkpoint))
    say(f"{spec.name}: {metric['name']} {metric['value']:.4f} on the held-out images; card {checkpoint.with_suffix('.json')}")


@task(
    help={
        "model": "trained registry model to compress",
        "method": "ptq | qat | kd | prune | prune+kd+ptq",
        "steps": "fine-tuning / distillation steps (default 600)",
        "keep": "prune: fraction of channels kept (default 0.375)",
        "weight_bits": "int8 methods: weight bits, 7 (default; exact on x86 without VNNI) or 8",
        "checkpoint": "trained weights to start from (default: the registry's)",
        "out": "folder for the variant and its card (default lwgan_models/checkpoints)",
        "threads": "torch threads (default: torch's choice)",
        "debug": "show tracebacks",
    }
)
@cli
def compress(c, model, method, steps=None, keep=None, weight_bits=None, checkpoint=None, out=None, threads=None,
             debug=False):
    """Make a compressed variant and measure its size, MACs and quality against the fp32 teacher."""
    import dataclasses

    import torch

    import lwgan_models
    from lwgan_models.compression import CompressConfig
    from lwgan_models.compression import compress as make_variant
    from lwgan_models.registry import CHECKPOINT_DIR

    if threads:
        torch.set_num_threads(_count(threads, "threads", 0))
    config = CompressConfig()
    if steps:
        config = dataclasses.replace(config, steps=_count(steps, "steps", 0))
    if weight_bits:
        config = dataclasses.replace(config, weight_bits=_count(weight_bits, "weight-bits", 0))
    if keep:
        try:
            config = dataclasses.replace(config, keep=float(keep))
        except ValueError:
            raise UserError(f"--keep {keep!r}: expected a fraction in (0, 1]") from None
    base = lwgan_models.load(model, checkpoint)
    card = make_variant(base, method, config, Path(out) if out else CHECKPOINT_DIR)
    say(f"card: {card}")


@task(
    help={
        "results": "folder of JSON-lines records (default: reports/results)",
        "out": "HTML file to write (default: reports/index.html)",
        "debug": "show tracebacks",
    }
)
@cli
def report(c, results=None, out=None, debug=False):
    """Render the self-contained HTML report from the records."""
    from bench.record import RESULTS_DIR, load_records
    from reports import render_report

    source = Path(results) if results else RESULTS_DIR
    path = render_report(load_records(source), Path(out) if out else DEFAULT_REPORT, source=str(source))
    say(f"report: {path}")


@task(help={"target": "device config name (default: host)", "debug": "show tracebacks"})
@cli
def demo(c, target="host", debug=False):
    """The main job: build the demo generators from the committed databases, benchmark, write the report."""
    bench(c, target=target, debug=debug)
    report(c, debug=debug)


namespace = Collection(train, compress, tune, bench, report, demo)
