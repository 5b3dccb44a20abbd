"""The adversarial robustness probe: attacks raise the loss they target, stay in budget, and the compiled
model behaves like the attacked one; records carry the probe and the report shows it."""

from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser

import onnx
import pytest
import torch

import targets
from bench.record import Record, append_records, load_records, robustness_verdict
from bench.robustness import (
    Probe,
    attack,
    attacked_module,
    budget,
    by_probe,
    heldout,
    output_distance,
    plan,
    probe_model,
    teacher_and_variants,
)
from compile.pipeline import from_registry, from_variant
from errors import UserError
from lwgan_models.compression import quantize
from lwgan_models.compression.evaluate import onnx_generator, psnr_db
from lwgan_models.registry import build_generator, find_variant, load
from reports import render_report
from reports.compare import compare_runs

SHAPE = (1, 3, 32, 32)
FP32 = "cyclegan-resnet6-ngf16+kd"  # the smallest shipped fp32 generator
INT8 = "cyclegan-resnet6-ngf16+prune+kd+ptq"
INT8_STYLE = "nst-cin4-w16+prune+kd+ptq"  # conditional instance norms: the exported style's affines come from the file


@pytest.fixture(scope="module")
def images(one_torch_thread):
    return heldout(SHAPE[-1], 3)


@pytest.fixture(scope="module", params=[FP32, INT8, INT8_STYLE])
def attacked(request, images):
    """(model under test, the module attacked, its clean output) for an fp32, an int8 and an int8 style network."""
    model = from_variant(find_variant(request.param), SHAPE)
    module = attacked_module(model)
    with torch.no_grad():
        return model, module, module(images)


def loss(module, x, clean) -> torch.Tensor:
    with torch.no_grad():
        return output_distance(module, x, clean)


@pytest.mark.parametrize("epsilon", [2, 8])
def test_attacks_raise_the_output_distance_beyond_random_noise_of_the_same_budget(attacked, images, epsilon):
    _, module, clean = attacked
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7)).sign()
    random = loss(module, (images + budget(epsilon) * noise).clamp(-1, 1), clean)
    fgsm = loss(module, attack(module, images, clean, Probe("fgsm", epsilon, 1)), clean)
    pgd = loss(module, attack(module, images, clean, Probe("pgd", epsilon, 5)), clean)
    assert (random > 0).all()  # the clean input is the loss's minimum: any perturbation moves the output a little
    assert (fgsm > 1.5 * random).all(), (fgsm, random)
    # More steps within the same ball find more; per image int8's straight-through gradients may miss it.
    assert pgd.sum() >= fgsm.sum(), (pgd, fgsm)


def test_perturbations_stay_in_the_epsilon_ball_and_the_input_range(attacked, images):
    _, module, clean = attacked
    for probe in (Probe("fgsm", 8, 1), Probe("pgd", 8, 3), Probe("pgd", 255, 2)):
        x = attack(module, images, clean, probe)
        assert (x - images).abs().max() <= budget(probe.epsilon) + 1e-6
        assert x.min() >= -1 and x.max() <= 1
        assert (x - images).abs().max() > 0.5 * budget(probe.epsilon)  # the budget is used, not ignored


def test_a_fixed_seed_reproduces_the_attack(attacked, images):
    _, module, clean = attacked
    probe = Probe("pgd", 4, 2)
    assert torch.equal(attack(module, images, clean, probe), attack(module, images, clean, probe))


def test_epsilon_counts_8_bit_levels_of_the_minus_one_to_one_input():
    assert budget(1) == pytest.approx(2 / 255)  # one level of [0, 255] pixels is 1/255 of [0, 1], 2/255 of [-1, 1]
    assert budget(255) == pytest.approx(2.0)


@pytest.mark.parametrize("epsilons", [(0,), (-1, 2), (256,), (float("nan"),)])
def test_bad_epsilon_is_refused(epsilons):
    with pytest.raises(UserError, match="epsilon"):
        plan(epsilons)


def test_plan_runs_each_attack_at_each_budget():
    probes = plan((1, 4), pgd_steps=7)
    assert [(p.attack, p.epsilon, p.steps) for p in probes] == [("fgsm", 1, 1), ("fgsm", 4, 1), ("pgd", 1, 7),
                                                                ("pgd", 4, 7)]


def test_teacher_first_then_its_shipped_variants():
    names = teacher_and_variants("nst-cin4-w16")
    assert names[0] == "nst-cin4-w16" and "nst-cin4-w16+ptq" in names and len(names) > 2
    assert teacher_and_variants("nst-cin4-w16", ["kd"]) == ["nst-cin4-w16", "nst-cin4-w16+kd"]
    for bad, fragment in (("no-such-gan", "is unknown"), ("nst-cin4-w16+kd", "is a variant")):
        with pytest.raises(UserError, match=fragment):
            teacher_and_variants(bad)
    with pytest.raises(UserError, match="has no bogus variant"):
        teacher_and_variants("nst-cin4-w16", ["bogus"])


def test_fake_quant_form_of_a_qdq_file_computes_what_the_file_does(tmp_path, images):
    """Through a shallow net the same arithmetic up to float reordering (deep ones flip single roundings)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1),
                              torch.nn.Tanh())
    prepared = quantize.calibrate(quantize.prepare(net, torch.zeros(SHAPE)), [images[i:i + 1] for i in range(3)])
    path = quantize.export_qdq(prepared, SHAPE, tmp_path / "net.onnx")
    loaded = quantize.load_qdq(net, path, torch.zeros(SHAPE))
    with torch.no_grad():
        assert psnr_db(loaded(images), onnx_generator(path)(images)) > 80
    wider = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 3, 3, padding=1))
    with pytest.raises(UserError, match="weight"):
        quantize.load_qdq(wider, path, torch.zeros(SHAPE))


def test_a_qdq_file_that_leaves_parameters_unset_is_refused(tmp_path):
    variant = find_variant(INT8_STYLE)
    model = onnx.load(str(variant.path))
    for node in model.graph.node:  # no style affine after the first instance norm
        if node.op_type == "InstanceNormalization":
            node.output[0] = "unused"
            break
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(UserError, match="not followed by a scale and shift"):
        quantize.load_qdq(build_generator(variant.card["arch"]), tmp_path / "broken.onnx", torch.zeros(SHAPE))


@pytest.fixture(scope="module")
def probed(images):
    """Records of the fp32 student (as the teacher) and the int8 variant, probed on TVM at 32x32."""
    target = targets.resolve(targets.load_target("host"))
    probes = [Probe("fgsm", 4, 1), Probe("pgd", 4, 2)]
    teacher = probe_model(from_registry(load(FP32), SHAPE), target, "run-r", images, probes, report=lambda line: None)
    variant = probe_model(from_variant(find_variant(INT8), SHAPE), target, "run-r", images, probes, by_probe(teacher),
                          report=lambda line: None)
    return teacher, variant


def test_tvm_behaves_like_the_attacked_model_on_adversarial_inputs(probed):
    teacher, variant = probed
    for record in teacher:  # fp32: within the bench's max-error tolerance
        assert record.valid and record.max_abs_err <= record.tolerance
        assert record.tvm_adversarial_psnr_db == pytest.approx(record.adversarial_psnr_db, abs=0.05)
    for record in variant:  # int8: integer kernels against fake-quant torch, by the bench's PSNR rule
        assert record.valid and record.output_psnr_db >= record.min_output_psnr_db
        assert record.tvm_adversarial_psnr_db == pytest.approx(record.adversarial_psnr_db, abs=1.5)


def test_records_carry_the_probe_and_the_teachers_value(probed, tmp_path):
    teacher, variant = probed
    for records in probed:
        assert [(r.attack, r.epsilon, r.attack_steps) for r in records] == [("fgsm", 4, 1), ("pgd", 4, 2)]
        assert all(r.runtime == "tvm" and r.attack_images == 3 and r.input_shape == list(SHAPE) for r in records)
        assert all(0 < r.adversarial_psnr_db < 60 and r.latency_p50_ms == 0 for r in records)
    assert [r.teacher_adversarial_psnr_db for r in teacher] == [r.adversarial_psnr_db for r in teacher]
    assert [r.teacher_adversarial_psnr_db for r in variant] == [r.adversarial_psnr_db for r in teacher]
    assert variant[0].precision == "int8" and variant[0].variant == "prune+kd+ptq"
    append_records(teacher + variant, tmp_path / "run-r.jsonl")
    frame = load_records(tmp_path)
    assert list(frame["attack"]) == ["fgsm", "pgd"] * 2 and list(frame["attack_steps"]) == [1, 2] * 2


def test_verdict_compares_with_the_teacher():
    assert robustness_verdict({"adversarial_psnr_db": 20.0, "teacher_adversarial_psnr_db": 25.0}) == ("more fragile", -5.0)
    assert robustness_verdict({"adversarial_psnr_db": 25.5, "teacher_adversarial_psnr_db": 25.0})[0] == "as robust"
    assert robustness_verdict({"adversarial_psnr_db": 30.0, "teacher_adversarial_psnr_db": 25.0})[0] == "less fragile"
    assert robustness_verdict({"adversarial_psnr_db": None, "teacher_adversarial_psnr_db": 25.0}) == ("—", None)


class Tables(HTMLParser):
    """Table cells by table id, and every image's alt text."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.alts: list[str] = []
        self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ""
        elif tag == "img":
            self.alts.append(attrs.get("alt", ""))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None


def probe_record(variant: str, attack_name: str, epsilon: float, psnr: float, teacher: float, **overrides) -> Record:
    model = "gan" if variant == "fp32" else f"gan+{variant}"
    return Record(run_id="run-p", model=model, family="cyclegan", variant=variant, weights="random",
                  input_shape=list(SHAPE), params=1, macs=1, size_fp32_bytes=4, target="host", device="host CPU",
                  isa_level="avx2", runtime="tvm", threads=1, base_model="gan", attack=attack_name, epsilon=epsilon,
                  attack_steps=1 if attack_name == "fgsm" else 10, attack_images=8, adversarial_psnr_db=psnr,
                  tvm_adversarial_psnr_db=psnr, teacher_adversarial_psnr_db=teacher, max_abs_err=1e-6, tolerance=2e-3,
                  timestamp="2025-11-25T07:00:00+00:00", **overrides)


def timed_record(run_id: str, p50: float) -> Record:
    return dataclasses.replace(probe_record("fp32", "fgsm", 1, 30.0, 30.0), run_id=run_id, attack=None, epsilon=None,
                               attack_steps=None, attack_images=None, adversarial_psnr_db=None,
                               tvm_adversarial_psnr_db=None, teacher_adversarial_psnr_db=None, samples=30,
                               latency_p50_ms=p50, latency_p90_ms=p50, latency_mean_ms=p50)


def test_report_shows_a_robustness_table_and_a_chart_per_attack_and_no_timing_table_sees_probes(tmp_path):
    probes = [probe_record(v, a, e, psnr - e + (0 if v == "fp32" else shift), psnr - e)
              for v, shift in (("fp32", 0), ("ptq", -3)) for a, psnr in (("fgsm", 40), ("pgd", 35)) for e in (1, 2, 4, 8)]
    append_records(probes + [timed_record("run-p", 5.0)], tmp_path / "results" / "run-p.jsonl")
    index = render_report(load_records(tmp_path / "results"), tmp_path / "index.html", source=tmp_path / "results")
    parser = Tables()
    parser.feed(index.read_text(encoding="utf-8"))
    header, *rows = parser.tables["robustness-gan"]
    cells = [dict(zip(header, row)) for row in rows]
    assert len(cells) == 16 and cells[0]["variant"] == "fp32" and cells[-1]["variant"] == "ptq"
    ptq_pgd_8 = next(c for c in cells if c["variant"] == "ptq" and c["attack"] == "PGD" and c["ε"] == "8/255")
    assert ptq_pgd_8["PSNR dB (torch)"] == "24.00" and ptq_pgd_8["teacher dB"] == "27.00"
    assert ptq_pgd_8["Δ dB"] == "-3.00" and ptq_pgd_8["verdict"] == "more fragile" and ptq_pgd_8["steps"] == "10"
    assert sum("PSNR against epsilon" in alt for alt in parser.alts) == 2  # FGSM and PGD
    [page] = (tmp_path / "index-devices").glob("*.html")
    device = Tables()
    device.feed(page.read_text(encoding="utf-8"))
    rows = [row for row in device.tables[""] if row and row[0] == "gan"]  # tables without an id gather under ""
    assert len(rows) == 1  # the one timed record; probes have no latency to show
    [change] = compare_runs(load_records(tmp_path / "results"), "run-p", "run-p")
    assert change.p50_a == 5.0


def test_old_records_without_probe_fields_still_render(tmp_path):
    old = {k: v for k, v in dataclasses.asdict(timed_record("run-o", 3.0)).items()
           if k not in ("attack", "epsilon", "attack_steps", "attack_images", "adversarial_psnr_db",
                        "tvm_adversarial_psnr_db", "teacher_adversarial_psnr_db")}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run-o.jsonl").write_text(json.dumps(old) + "\n")
    frame = load_records(tmp_path / "results")
    assert frame["attack"].isna().all()
    page = render_report(frame, tmp_path / "index.html", source=tmp_path / "results").read_text(encoding="utf-8")
    assert 'id="robustness' not in page



@pytest.mark.parametrize("args, fragments", [
    (("--model", "no-such-gan"), ("is unknown", "no-such-gan")),
    (("--model", "nst-cin4-w16", "--epsilon", "0,2"), ("epsilon 0", "(0, 255]")),
])
def test_bad_input_is_one_line(args, fragments):
    from test_cli import assert_one_line_error, invoke

    assert_one_line_error(invoke("robustness", *args), *fragments)
