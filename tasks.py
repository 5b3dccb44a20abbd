"""The command line: `invoke --list` shows every task, `invoke --help TASK` its flags.

Tasks are thin: the work lives in the stage packages (lwgan_models, compile, targets, bench,
reports), so everything here is also callable from Python and tested there.
"""

from __future__ import annotations

import contextlib
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
        except KeyboardInterrupt:  # Ctrl-C: the shell's convention, 128 + SIGINT
            print("interrupted", file=sys.stderr, flush=True)
            raise Exit(code=130) from None

    return wrapper


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


@contextlib.contextmanager
def _keeping_records(out: Path, samples_dir: Path):
    """A run that fails or is interrupted keeps the records it appended and removes sample images no record
    points to; Ctrl-C ends it with exit code 130, saying how many records its file kept."""
    from bench.record import drop_unrecorded_samples

    try:
        yield
    except BaseException as exc:
        kept = drop_unrecorded_samples(out, samples_dir)
        if isinstance(exc, KeyboardInterrupt):
            raise Exit(f"interrupted; {kept} records kept in {out}", code=130) from None
        raise


SHAPE_HELP = ("input shape NxCxHxW (default: the model's, or the target's); an ONNX file's inputs by name, "
              "NAME=SHAPE (repeatable, or separated by commas)")
INPUT_HELP = ("an ONNX file's input from a .npy file, NAME=FILE.npy (repeatable); inputs not given are filled "
              "deterministically, and each record says how")
IMAGE_HELP = "an ONNX file's image input, where its 4-D float inputs leave that open"


def _target(target: str, isa: str | None):
    import targets

    return targets.resolve(targets.load_target(target), isa)


@task(
    iterable=["shape", "input"],
    help={
        "target": "device config name under targets/ (e.g. host)",
        "model": "registry model name, or several separated by commas",
        "onnx": "an ONNX model file to tune instead of a registry model (A.onnx,B.onnx: the two chained)",
        "shape": SHAPE_HELP,
        "input": INPUT_HELP,
        "image": IMAGE_HELP,
        "trials": "total MetaSchedule trials (default: the target's tuning budget)",
        "trials_per_task": "trials per tuning task (default: the target's)",
        "isa": "ISA level of the target to tune for (default: detected)",
        "focus": "tune only the N tasks where the tuned model spends most time (a rerun's budget goes there)",
        "debug": "show tracebacks",
    }
)
@cli
def tune(c, model=None, onnx=None, target="host", shape=None, input=None, image=None, trials=None, trials_per_task=None,
         isa=None, focus=None, debug=False):
    """Tune with MetaSchedule (XGBoost cost model); appends to autotune_logs/<target-level>/<model>/."""
    from compile.pipeline import database_of, tune_for_target
    from compile.subjects import models_under_test

    resolved = _target(target, isa)
    if resolved.config.tuning_trials == 0:
        raise UserError(f"target {target!r} is not tuned (its [tuning] budget is 0): {resolved.config.label}")
    budget = _count(trials, "trials", resolved.config.tuning_trials)
    per_task = _count(trials_per_task, "trials-per-task", resolved.config.tuning_trials_per_task)
    focus = _count(focus, "focus", None)
    if not (model or onnx):
        raise UserError("say what to tune: --model NAME or --onnx FILE")
    for subject in models_under_test(model, onnx, shape, checkpoint=None, demo_only=False, inputs=input, image=image):
        database = database_of(subject, resolved)
        say(f"{subject.name}: {database.record_count()} records so far in {database.path}")
        started = time.time()
        ran = tune_for_target(subject, resolved, budget, per_task, report=say, focus=focus)
        say(f"{subject.name}: {ran} trials in {time.time() - started:.0f} s; "
            f"database now has {database.record_count()} records")


@task(
    iterable=["shape", "input"],
    help={
        "target": "device config name under targets/ (e.g. host)",
        "model": "registry model name(s), comma separated (default: the target's bench models, else the demo set)",
        "onnx": "an ONNX model file to benchmark instead (TVM vs ONNX Runtime and OpenVINO); A.onnx,B.onnx runs "
                "A then B as one model, A's outputs feeding B's inputs of the same names",
        "input": INPUT_HELP,
        "image": IMAGE_HELP,
        "runtimes": "comma-separated runtimes (default: every installed one the target runs; see `invoke runtimes`)",
        "samples": "timed samples per runtime (default: the target's rule)",
        "threads": "threads for every runtime (default: the target's)",
        "isa": "ISA level (default: detected)",
        "all_models": "every registered model, not just the demo set",
        "shape": SHAPE_HELP,
        "results": "folder for the records (default: reports/results)",
        "checkpoint": "weights to load instead of the registry's (one model only), e.g. an official latest_net_G_A.pth",
        "roofline": "also profile TVM's kernels: GFLOP/s per kernel against this machine's measured FMA peak",
        "debug": "show tracebacks",
    }
)
@cli
def bench(c, target="host", model=None, onnx=None, runtimes=None, samples=None, threads=None, isa=None,
          all_models=False, shape=None, input=None, image=None, results=None, checkpoint=None, roofline=False,
          debug=False):
    """Benchmark models side by side; appends records to reports/results/<run-id>.jsonl."""
    import dataclasses

    from bench.record import RESULTS_DIR
    from bench.run import bench_models, new_run_id
    from bench.runtimes import parse as parse_runtimes
    from compile.subjects import models_under_test

    resolved = _target(target, isa)
    config = resolved.config
    rules = dataclasses.replace(
        config.bench, samples=_count(samples, "samples", config.bench.samples),
        threads=_count(threads, "threads", config.bench.threads),
    )
    if not (onnx or all_models):  # the device's own default set, where its config names one
        model = model or ",".join(config.default_models) or None
        shape = shape or (config.default_input_shape and "x".join(map(str, config.default_input_shape)))
    subjects = models_under_test(model, onnx, shape, checkpoint, demo_only=not all_models, inputs=input, image=image)
    chosen = tuple(spec.name for spec in parse_runtimes(runtimes.split(","), config.place)) if runtimes else None
    run_id = new_run_id()
    out = (Path(results) if results else RESULTS_DIR) / f"{run_id}.jsonl"
    say(f"run {run_id}: {len(subjects)} model(s) on {resolved.config.label} [{resolved.db_key}], {rules.threads} threads")
    samples_dir = out.parent / f"{run_id}.samples"
    with _keeping_records(out, samples_dir):
        records = bench_models(subjects, resolved, run_id, out, say, runtimes=chosen, rules=rules,
                               samples_dir=samples_dir, roofline=roofline)
    say(f"records: {out}")
    if any(not r.valid and r.beyond_tolerance() for r in records):
        raise Exit("error: some outputs differ from the reference beyond tolerance (records kept, marked invalid)", code=2)


@task(
    help={
        "model": "base registry model (its shipped compressed variants are probed beside it), e.g. nst-cin4-w16",
        "variants": "comma-separated compression methods to probe (default: every shipped variant), e.g. kd,ptq",
        "epsilon": "comma-separated budgets in 8-bit levels, ε/255 (default 1,2,4,8)",
        "steps": "PGD steps (default 10; step size 2.5 ε / steps)",
        "size": "square input size in pixels (default 64)",
        "images": "held-out images to attack (default: all of them)",
        "results": "folder for the records (default: reports/results)",
        "isa": "ISA level of the host TVM build (default: detected)",
        "debug": "show tracebacks",
    }
)
@cli
def robustness(c, model, variants=None, epsilon=None, steps=None, size=None, images=None, results=None, isa=None,
               debug=False):
    """FGSM and PGD against a generator and its compressed variants; appends records to reports/results/<run-id>.jsonl."""
    from bench.record import RESULTS_DIR
    from bench.robustness import EPSILONS, PGD_STEPS, TABLE_HEADER, heldout, plan, probe_models, teacher_and_variants
    from bench.run import new_run_id
    from compile.subjects import models_under_test

    names = teacher_and_variants(model, [m.strip() for m in variants.split(",") if m.strip()] if variants else None)
    try:
        epsilons = tuple(float(e) for e in epsilon.split(",")) if epsilon else EPSILONS
    except ValueError:
        raise UserError(f"--epsilon {epsilon!r}: expected comma-separated 8-bit levels, e.g. 1,2,4,8") from None
    probes = plan(epsilons, _count(steps, "steps", PGD_STEPS))
    pixels = _count(size, "size", 64)
    attacked = heldout(pixels, _count(images, "images", None))
    resolved = _target("host", isa)
    subjects = models_under_test(",".join(names), None, f"1x3x{pixels}x{pixels}", None, demo_only=False)
    run_id = new_run_id()
    out = (Path(results) if results else RESULTS_DIR) / f"{run_id}.jsonl"
    say(f"run {run_id}: {len(subjects)} model(s), {len(probes)} probes each, {len(attacked)} held-out images "
        f"at {pixels}x{pixels}, TVM on {resolved.config.label} [{resolved.db_key}]")
    say(TABLE_HEADER)
    with _keeping_records(out, out.parent / f"{run_id}.samples"):
        probe_models(subjects, resolved, run_id, attacked, probes, out, say)
    say(f"records: {out}")


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
    from lwgan_models.registry import CHECKPOINT_DIR, arch_family
    from lwgan_models.training import RUNS_DIR

    spec = lwgan_models.get(model)
    checkpoint = Path(out) if out else CHECKPOINT_DIR / f"{spec.name}.pt"
    work_dir = RUNS_DIR / checkpoint.stem
    if threads:
        torch.set_num_threads(_count(threads, "threads", 0))
    crop, epochs, steps = (_count(value, flag, 0) if value else None
                           for flag, value in (("crop", crop), ("epochs", epochs), ("steps", steps)))
    arch_family(spec.arch).train(spec.arch, checkpoint, work_dir, epochs, steps, crop, dataroot)
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
    iterable=["compare"],
    help={
        "results": "folder of JSON-lines records (default: reports/results)",
        "out": "HTML file to write (default: reports/index.html, device pages in reports/index-devices/)",
        "compare": "two run ids, RUN_A,RUN_B (or the flag twice): a page of what changed from A to B",
        "debug": "show tracebacks",
    }
)
@cli
def report(c, results=None, out=None, compare=None, debug=False):
    """Render the self-contained HTML report (index + a page per device), or compare two runs."""
    from bench.record import RESULTS_DIR, load_records
    from reports import render_comparison, render_report

    source = Path(results) if results else RESULTS_DIR
    records = load_records(source)
    for line in records.attrs["skipped"]:  # torn or foreign lines: the rest still renders
        print(f"warning: {line}", file=sys.stderr)
    if compare:
        runs = [run.strip() for item in compare for run in item.split(",") if run.strip()]
        if len(runs) != 2:
            raise UserError(f"--compare takes two run ids (RUN_A,RUN_B), got {len(runs)}: {', '.join(runs)}")
        path, changes = render_comparison(records, runs[0], runs[1],
                                          Path(out) if out else DEFAULT_REPORT.with_name(f"compare-{runs[0]}-{runs[1]}.html"))
        for change in changes:
            if change.verdict in ("regression", "became invalid"):
                key = change.key
                say(f"{change.verdict}: {key['model']} on {key['runtime']} ({key['target']}): "
                    f"p50 {change.p50_a:.3f} -> {change.p50_b:.3f} ms (noise ±{100 * change.threshold:.1f}%)")
        counted = {v: sum(c.verdict == v for c in changes) for v in ("regression", "improvement", "same")}
        say(f"{counted['regression']} regressions, {counted['improvement']} improvements, {counted['same']} unchanged "
            f"beyond noise; comparison: {path}")
        return
    path = render_report(records, Path(out) if out else DEFAULT_REPORT, source=str(source))
    say(f"report: {path} (device pages in {path.with_name(path.stem + '-devices')})")


@task(help={"target": "device config name (default: host)", "debug": "show tracebacks"})
@cli
def demo(c, target="host", debug=False):
    """The main job: build the demo generators from the committed databases, benchmark, write the report."""
    bench(c, target=target, debug=debug)
    report(c, debug=debug)


@task(
    help={
        "model": "registry model or variant name",
        "onnx": "an ONNX generator file to profile instead",
        "target": "device config name (default host; profiles run on the host)",
        "runtimes": "comma-separated runtimes (default: every installed one with a profiler)",
        "shape": "input shape NxCxHxW instead of the model's default",
        "threads": "threads for every runtime (default: the target's)",
        "out": "file to write, .csv or .json (default build/profiles/<model>.csv)",
        "isa": "ISA level (default: detected)",
        "debug": "show tracebacks",
    }
)
@cli
def profile(c, model=None, onnx=None, target="host", runtimes=None, shape=None, threads=None, out=None, isa=None,
            debug=False):
    """Per-op profile of each runtime (TVM kernels, OpenVINO nodes, ORT nodes, torch ops) as CSV or JSON."""
    from bench.profile import profile_model, write_profile
    from bench.runtimes import installed
    from compile.subjects import models_under_test

    resolved = _target(target, isa)
    chosen = tuple(runtimes.split(",")) if runtimes else tuple(spec.name for spec in installed("host"))
    threads = _count(threads, "threads", resolved.config.bench.threads)
    subjects = models_under_test(model, onnx, shape, None, demo_only=True)
    if out and len(subjects) > 1:
        raise UserError(f"--out names one file, and {len(subjects)} models would be profiled; give one --model")
    for subject in subjects:
        rows, skipped = profile_model(subject, resolved, chosen, threads, report=say)
        path = write_profile(rows, skipped, Path(out) if out else Path("build") / "profiles" / f"{subject.name}.csv")
        say(f"{subject.name}: {len(rows)} op rows written to {path}")


@task(help={"debug": "show tracebacks"})
@cli
def runtimes(c, debug=False):
    """The registered runtimes (bench/runtimes/): what each loads, where it runs, its installed version."""
    from bench.runtimes import registered

    for spec in registered():
        say(f"{spec.name:14s} {spec.label:14s} loads {spec.artifact:7s} runs on {'+'.join(spec.places):11s} "
            f"{spec.package} {spec.version() or 'not installed'}")


@task(
    help={
        "host": "address to listen on (default 127.0.0.1; any other exposes TVM RPC, which has no authentication)",
        "port": "port (default 9190)",
        "debug": "show tracebacks",
    }
)
@cli
def tracker_start(c, host="127.0.0.1", port=None, debug=False):
    """Start the TVM RPC tracker in the background (state and log in build/rpc/)."""
    from targets import rpc

    rpc.start_tracker(host, _count(port, "port", rpc.DEFAULT_PORT), report=say)


@task(help={"debug": "show tracebacks"})
@cli
def tracker_stop(c, debug=False):
    """Stop the tracker started by tracker.start (its whole process group)."""
    from targets import rpc

    rpc.stop_tracker(report=say)


@task(help={"host": "tracker address (default 127.0.0.1)", "port": "port (default 9190)", "debug": "show tracebacks"})
@cli
def tracker_status(c, host="127.0.0.1", port=None, debug=False):
    """Boards registered at the tracker and free per key (like tvm.exec.query_rpc_tracker)."""
    from targets import rpc

    say(rpc.tracker_status(host, _count(port, "port", rpc.DEFAULT_PORT)))


@task(
    help={
        "model": "registry model (or variant) whose database to check, comma separated",
        "target": "device config name (default host)",
        "isa": "ISA level (default: detected)",
        "path": "a database folder to check instead (holding database_workload.json and database_tuning_record.json)",
        "debug": "show tracebacks",
    }
)
@cli
def db_check(c, model=None, target="host", isa=None, path=None, debug=False):
    """Validate tuning databases line by line (fsck-style): which lines are unusable, and why."""
    from compile.database import TuningDatabase, database_for

    if path:
        databases = [TuningDatabase(Path(path))]
    else:
        resolved = _target(target, isa)
        names = [m.strip() for m in (model or "").split(",") if m.strip()]
        if not names:
            raise UserError("db.check needs --model (or --path)")
        databases = [database_for(resolved.db_key, name) for name in names]
    unusable = 0
    for database in databases:
        problems = database.check()
        unusable += len(problems)
        for problem in problems:
            say(problem)
        say(f"{database.path}: {'sound' if not problems else f'{len(problems)} unusable line(s)'} "
            f"({database.record_count()} records)")
    if unusable:
        raise Exit(code=1)


db = Collection("db")
db.add_task(db_check, name="check")

tracker = Collection("tracker")
tracker.add_task(tracker_start, name="start")
tracker.add_task(tracker_stop, name="stop")
tracker.add_task(tracker_status, name="status")


def _rpc_target(target: str):
    import targets

    config = targets.load_target(target)
    if config.place != "board":
        raise UserError(f"target {target!r} is not an RPC board (connection {config.connection!r}); "
                        "try --target aarch64-emu")
    return config


@task(
    help={
        "target": "RPC target whose key the emulated board registers under (default aarch64-emu)",
        "rootfs": "folder of the board's Debian arm64 rootfs (default build/boards/aarch64-bookworm)",
        "debug": "show tracebacks",
    }
)
@cli
def board_emulate(c, target="aarch64-emu", rootfs=None, debug=False):
    """Start an emulated aarch64 board (TVM RPC server under qemu-user); builds its rootfs the first time."""
    from targets import emulated, rpc

    config = _rpc_target(target)
    root = emulated.ensure_rootfs(Path(rootfs) if rootfs else emulated.ROOTFS_DIR, report=say)
    host, port, _ = rpc.tracker_address(config)
    if not rpc.tracker_reachable(host, port) and host in rpc.LOCAL_HOSTS:
        rpc.start_tracker(host, port, report=say)
    emulated.start_board(config, root, report=say)


@task(help={"target": "RPC target of the emulated board (default aarch64-emu)", "debug": "show tracebacks"})
@cli
def board_emulate_stop(c, target="aarch64-emu", debug=False):
    """Stop the emulated board started by board.emulate (its whole process group)."""
    from targets import emulated

    emulated.stop_board(_rpc_target(target), report=say)


@task(help={"target": "RPC target of the emulated board (default aarch64-emu)", "debug": "show tracebacks"})
@cli
def board_emulate_status(c, target="aarch64-emu", debug=False):
    """Whether the emulated board runs, is registered and free, and what it reported about itself."""
    from targets import emulated

    say(emulated.board_status(_rpc_target(target)).describe())


@task(
    help={
        "rootfs": "folder of the board's Debian arm64 rootfs (default build/boards/aarch64-bookworm)",
        "debug": "show tracebacks",
    }
)
@cli
def board_rootfs(c, rootfs=None, debug=False):
    """Build the emulated board's rootfs (Debian arm64 + TVM) once, without starting it (install.sh runs this)."""
    from targets import emulated

    root = emulated.ensure_rootfs(Path(rootfs) if rootfs else emulated.ROOTFS_DIR, report=say)
    say(f"emulated board rootfs ready: {root}")


board = Collection("board")
board.add_task(board_rootfs, name="rootfs")
board.add_task(board_emulate, name="emulate")
board.add_task(board_emulate_stop, name="emulate-stop")
board.add_task(board_emulate_status, name="emulate-status")


@task(
    name="up",
    help={
        "target": "board config name under targets/ (or a .toml path), with [rpc] and optionally [ssh] tables",
        "ssh": "the board as user@host[:port] (default: the target's [ssh] table)",
        "debug": "show tracebacks",
    },
)
@cli
def board_up(c, target, ssh=None, debug=False):
    """Start TVM's RPC server on a board over SSH (installing the host's TVM there if needed); register it at the tracker.

    With a tracker on this machine's loopback the board reaches it through a reverse SSH tunnel, so
    this command stays in the foreground holding it: Ctrl-C stops the board's server.
    """
    import targets
    from targets.board import bring_up

    config = targets.load_target(target)
    running = bring_up(config, ssh, report=say)
    host, port = running.address
    say(f"board {config.rpc['key']!r} registered at tracker {config.rpc['tracker_host']}:{config.rpc['tracker_port']}"
        f" as {host}:{port} (server pid {running.pid} on the board, up in {running.seconds:.1f} s)")
    try:
        if running.tunnel is None:
            say(f"the server keeps running after this command; stop it with `invoke board.down --target {target}`")
            return
        say("holding the SSH tunnel to the tracker: keep this running; Ctrl-C (or board.down) stops the board's server")
        try:
            running.hold()
            say(f"board server (pid {running.pid}) was stopped or replaced; tunnel closed")
        except KeyboardInterrupt:
            state, pid = running.stop()
            say(f"board server (pid {pid}) stopped" if state == "stopped" else "board server was already stopped")
    finally:
        running.close()


@task(
    name="down",
    help={
        "target": "board config name under targets/ (or a .toml path)",
        "ssh": "the board as user@host[:port] (default: the target's [ssh] table)",
        "debug": "show tracebacks",
    },
)
@cli
def board_down(c, target, ssh=None, debug=False):
    """Stop the RPC server board.up started on the board (its process group, from the pid file there)."""
    import targets
    from targets.board import bring_down

    state, pid = bring_down(targets.load_target(target), ssh)
    if state == "stopped":
        say(f"board server (pid {pid}) stopped")
    elif state == "stale":
        say(f"board server (pid {pid}) was no longer running; removed its pid file")
    else:
        say("no board server started by board.up is running there")


board.add_task(board_up)
board.add_task(board_down)

@task(
    help={
        "model": "registry model or variant, e.g. cyclegan-resnet6-ngf16+kd or cyclegan-resnet6-ngf16+prune+kd+ptq",
        "target": "a microcontroller (C project + firmware, default cortex-m4) or an OpenCL board (e.g. rock5b)",
        "shape": "input shape NxCxHxW (default: the target's bench input_shape, else the model's)",
        "out": "output folder (default build/firmware/<target>-<model> or build/opencl/<target>)",
        "debug": "show tracebacks",
    }
)
@cli
def build(c, model, target="cortex-m4", shape=None, out=None, debug=False):
    """Build a model for a device whose code is not benchmarked here: a standalone C project and firmware for a
    microcontroller, or a GPU board's library whose OpenCL kernels are compiled and run with pocl."""
    from bench.standalone import build_standalone
    from compile.subjects import models_under_test

    resolved = _target(target, None)
    default_shape = resolved.config.default_input_shape
    subjects = models_under_test(model, None, shape or (default_shape and "x".join(map(str, default_shape))), None,
                                 demo_only=False)
    if len(subjects) != 1:
        raise UserError(f"--model {model}: build takes one model")
    check = build_standalone(subjects[0], resolved, Path(out) if out else None, report=say)
    if check is not None and check.violations:
        raise Exit(f"error: {subjects[0].name}: OpenCL output differs from the reference beyond tolerance", code=2)


namespace = Collection(train, compress, tune, bench, report, demo, build, runtimes, profile, robustness)
namespace.add_collection(tracker)
namespace.add_collection(db)
namespace.add_collection(board)
