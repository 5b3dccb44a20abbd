"""Benchmark a model under test on a board over TVM RPC (targets with connection "rpc").

The library is cross-compiled here for the board's CPU, uploaded through a session the tracker
hands out, and run by the board's Relax VM. Its output on the same test image is checked against
the host's torch reference under the same rule as local runs, and TVM's time evaluator times it
on the board (a sample is one inference, as on the host). Records carry the board's fingerprint,
read on the board.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable

from tvm import relax

from bench.energy import measure_energy
from bench.fingerprint import host_fingerprint
from bench.harness import time_runtimes
from bench.record import Record
from bench.run import (
    check_output,
    measurement_fields,
    model_fields,
    reference_output,
    report_tuning,
    save_sample,
    target_fields,
    test_image,
    tvm_build_fields,
)
from bench.runtimes import TvmRuntime
from compile.pipeline import ModelUnderTest, compile_for_target
from targets import BenchRules, ResolvedTarget, rpc
from targets.power import open_target_probe


class RemoteTvmRuntime(TvmRuntime):
    """A Relax VM on the board: TvmRuntime with the board's device and thread pool."""

    def __init__(self, session, library: Path, threads: int) -> None:
        self.session = session  # keeps the board's session (and what it loaded) open
        session.upload(str(library), library.name)
        device = session.cpu()
        super().__init__(relax.VirtualMachine(session.load_module(library.name), device), device, threads,
                         runtime_function=session.get_function)


def bench_remote(
    model: ModelUnderTest,
    target: ResolvedTarget,
    run_id: str,
    rules: BenchRules | None = None,
    report: Callable[[str], None] = print,
    samples_dir: Path | None = None,
) -> list[Record]:
    """Time `model` with TVM on the target's board; one Record (the board runs no torch or ONNX Runtime)."""
    config = target.config
    host, port, key = rpc.tracker_address(config)
    rules = rules or config.bench
    rpc.require_board(config)  # before minutes of compiling, fail if there is no board to run on
    x = test_image(model.input_shape)
    reference = reference_output(model, x)
    sample = save_sample(reference, samples_dir / f"{model.name}.png") if samples_dir else None

    report(f"  {model.name}: cross-compiling for {config.name} ({config.cross.get('cc')}, {target.tvm_target.attrs.get('mcpu')})")
    compiled = compile_for_target(model, target)
    report_tuning(model, target, compiled, report)
    report(f"  {model.name}: session to a {key!r} board via {host}:{port}")
    session = rpc.connect(config)
    board = rpc.board_fingerprint(session)
    adapter = RemoteTvmRuntime(session, compiled.library, rules.threads)
    check = check_output(model, adapter.name, adapter.run(x), reference)
    adapter.prepare(x)
    report(f"  {model.name}: timing tvm on the board ({rules.samples}+ samples, {rules.threads} threads)")
    timing = time_runtimes([adapter], rules)[0]
    with open_target_probe(config) as probe:
        power = measure_energy(adapter, probe, rules)
    if power.get("power_error"):
        report(f"  {model.name}: power not measured: {power['power_error']}")
    env = {**board, "connection": f"rpc {host}:{port} key {key}", "git_sha": host_fingerprint()["git_sha"]}
    record = Record(
        run_id=run_id,
        **model_fields(model),
        **target_fields(target),
        runtime=adapter.name,
        threads=adapter.threads,
        artifact_bytes=compiled.library.stat().st_size,
        **tvm_build_fields(compiled),
        **measurement_fields(timing, check),
        sample_png=sample and sample.relative_to(samples_dir.parent).as_posix(),
        env=env,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **power,
    )
    report(f"  {model.name:28s} tvm@{key:10s} p50 {record.latency_p50_ms:9.3f} ms  cov {record.latency_cov:5.3f}  "
           f"err {check.max_abs_err:.1e}  {check.psnr_db:.1f} dB" + ("" if record.valid else "  INVALID: " + record.invalid_reason))
    return [record]
