"""compile/schedules/pad.py: torch's and ONNX's reflection pads become one kernel that pads exactly as torch does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, topi

from compile.onnx_import import onnx_to_relax
from compile.schedules.pad import mirror_pad_width, packed_reflection_pad, reflection_pad, reflection_pads
from compile.torch_import import torch_to_relax
from lwgan_models.onnx_export import export_onnx


def _ops(mod: tvm.IRModule) -> list[str]:
    return [binding.value.op.name for func in mod.functions.values() if isinstance(func, relax.Function)
            for block in func.body.blocks for binding in block.bindings
            if isinstance(binding.value, relax.Call) and isinstance(binding.value.op, tvm.ir.Op)]


@pytest.mark.parametrize("pad, shape", [
    (3, (1, 3, 20, 37)),  # a generator's first 7x7 conv: RGB, odd width
    (1, (2, 5, 8, 16)),  # batch; a residual block's pad
    (2, (1, 4, 3, 6)),  # a pad of nearly the whole height
])
def test_reflection_pad_kernel_matches_torch(pad, shape, host_target):
    net = torch.nn.ReflectionPad2d(pad).eval()
    mod, replaced = reflection_pads(torch_to_relax(net, shape, "pad"))
    assert replaced == 1 and "relax.take" not in _ops(mod)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = relax.VirtualMachine(tvm.compile(mod, host_target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, net(torch.from_numpy(x)).numpy())


class _UpsampleConv(torch.nn.Module):
    """A style-transfer decoder layer: nearest x2 upsampling, reflection pad, conv."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.layer = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest"),
                                         torch.nn.ReflectionPad2d(pad), torch.nn.Conv2d(8, 8, 2 * pad + 1))

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("pad, shape", [(1, (1, 8, 16, 16)), (4, (2, 8, 5, 9))])
def test_upsampling_before_a_reflection_pad_joins_its_kernel(pad, shape, host_target):
    torch.manual_seed(0)
    net = _UpsampleConv(pad).eval()
    mod, replaced = reflection_pads(torch_to_relax(net, shape, "upsample"))
    assert replaced == 1 and not {"relax.take", "relax.image.resize2d"} & set(_ops(mod))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = relax.VirtualMachine(tvm.compile(mod, host_target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bilinear_upsampling_stays_its_own_op():
    net = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="bilinear"), torch.nn.ReflectionPad2d(1)).eval()
    mod, replaced = reflection_pads(torch_to_relax(net, (1, 2, 6, 6), "bilinear"))
    assert replaced == 1 and "relax.image.resize2d" in _ops(mod)


def test_other_gathers_are_left_alone():
    mod = torch_to_relax(torch.nn.ReplicationPad2d(1).eval(), (1, 2, 6, 6), "replicate")
    before = _ops(mod)
    assert before.count("relax.take") == 2  # a take along each axis, as for a reflection
    rewritten, replaced = reflection_pads(mod)
    assert replaced == 0 and _ops(rewritten) == before


@pytest.mark.parametrize("upsampled, pad, shape", [
    (False, 3, (1, 3, 20, 37)),  # an RGB stem's pad, odd width
    (False, 1, (2, 5, 8, 16)),
    (True, 1, (1, 8, 16, 16)),  # a style-transfer decoder: nearest x2, then the pad
    (True, 4, (2, 8, 5, 9)),
])
def test_onnx_reflect_pads_become_the_same_kernel(upsampled, pad, shape, host_target, tmp_path):
    """The ONNX importer writes a reflect Pad as TOPI's mirror_pad function; it becomes the vectorized
    kernel too (with a nearest upsampling before it), and pads as torch does."""
    torch.manual_seed(0)
    net = (_UpsampleConv(pad) if upsampled else torch.nn.Sequential(torch.nn.ReflectionPad2d(pad))).eval()
    imported = onnx_to_relax(export_onnx(net, shape, tmp_path / "pad.onnx"))
    pads = [f for gv, f in imported.functions_items() if gv.name_hint.startswith("mirror_pad")]
    assert [mirror_pad_width(f) for f in pads] == [pad]
    mod, replaced = reflection_pads(imported)
    called = [binding.value.args[0].name_hint for block in mod["main"].body.blocks for binding in block.bindings
              if isinstance(binding.value, relax.Call) and binding.value.op.name == "relax.call_tir"]
    assert replaced == 1 and called == ["reflection_pad"] and "relax.image.resize2d" not in _ops(mod)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = relax.VirtualMachine(tvm.compile(mod, host_target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_other_tir_functions_are_no_mirror_pads(tmp_path):
    """A zero pad and an edge (replicate) pad are TIR functions of the same shape: neither is read as a reflection."""
    for layer in (torch.nn.ZeroPad2d(2), torch.nn.ReplicationPad2d(2)):
        imported = onnx_to_relax(export_onnx(torch.nn.Sequential(layer).eval(), (1, 3, 8, 8), tmp_path / "pad.onnx"))
        functions = [f for gv, f in imported.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        assert all(mirror_pad_width(f) is None for f in functions)
        assert reflection_pads(imported)[1] == 0


def _padded_and_quantized(shape, pad: int, also_float: bool) -> tvm.IRModule:
    """An int8 file's pad before a conv, as the ONNX importer writes it: TOPI's mirror_pad, then a
    uint8 quantize; with `also_float`, the float pad is read by a float op too."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            padded = bb.emit_te(topi.nn.mirror_pad, x, [0, 0, pad, pad], [0, 0, pad, pad], "REFLECT")
            quantized = bb.emit(relax.op.quantize(padded, relax.const(0.5, "float32"), relax.const(128, "uint8"),
                                                  axis=1, out_dtype="uint8"))
            result = bb.emit_output(relax.Tuple([quantized, bb.emit(relax.op.add(padded, padded))])
                                    if also_float else quantized)
        bb.emit_func_output(result)
    return bb.get()


@pytest.mark.parametrize("also_float", [False, True])
def test_a_quantize_after_the_pad_joins_its_kernel_exactly(also_float, host_target):
    """Values halfway between two steps and past both ends of uint8 come out as relax.quantize writes them;
    a pad read by a float op too keeps its float output, and the quantize its own kernel."""
    shape = (1, 3, 6, 19)
    mod = _padded_and_quantized(shape, 2, also_float)
    rewritten, replaced = reflection_pads(mod)
    called = [binding.value.args[0].name_hint for block in rewritten["main"].body.blocks
              for binding in block.bindings if isinstance(binding.value, relax.Call)
              and binding.value.op.name == "relax.call_tir"]
    assert replaced == 1 and len(called) == 1 and called[0].startswith("reflection_pad")
    assert ("relax.quantize" in _ops(rewritten)) == also_float
    x = ((np.arange(np.prod(shape)).reshape(shape) % 300 - 150 + 0.5) * 0.5).astype(np.float32)  # all halfway
    outputs = []
    for module in (mod, rewritten):
        got = relax.VirtualMachine(tvm.compile(module, host_target), tvm.cpu())["main"](tvm.runtime.tensor(x))
        outputs.append([t.numpy() for t in got] if also_float else [got.numpy()])
    for expected, got in zip(*outputs):
        np.testing.assert_array_equal(got, expected)
    assert {0, 255} <= set(np.unique(outputs[1][0]))  # clipped at both ends


def _run_kernel(func: tvm.tirx.PrimFunc, x: np.ndarray, out: np.ndarray, target) -> np.ndarray:
    library = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    tensors = [tvm.runtime.tensor(a) for a in (x, out)]
    library.mod["main"](*tensors)
    return tensors[1].numpy()


@pytest.mark.parametrize("shape, pad, scale, extra_columns, extra_groups", [
    ((1, 64, 8, 32), 1, 1, 0, 0),  # a residual block's pad: 16-column chunks, whole 4-channel groups
    ((1, 3, 13, 13), 3, 1, 5, 0),  # RGB (a zero-point fourth channel), an odd width (one column a chunk), whole tiles
    ((2, 8, 5, 6), 2, 2, 2, 0),  # batch; upsampled x2 first (12 columns: 4-column chunks)
    ((1, 96, 4, 16), 1, 1, 0, 8),  # an AMX conv's 96 channels in 2 blocks of 64: 8 groups of zero points
])
def test_packed_pad_stores_the_quantized_pad_interleaved_for_the_int8_conv(shape, pad, scale, extra_columns,
                                                                           extra_groups, host_target):
    """Byte for byte the quantizing pad's output, its channels in groups of 4 side by side, the zero point in
    the channels, groups and columns past the input's; the same from the input quantized already."""
    n, channels, height, width = shape
    quantize_to = (0.05, 7.0)
    out_h, out_w = height * scale + 2 * pad, width * scale + 2 * pad
    packed_shape = (n, -(-channels // 4) + extra_groups, out_h, out_w + extra_columns, 4)
    x = (np.random.default_rng(0).standard_normal(shape) * 4).astype(np.float32)
    got = _run_kernel(packed_reflection_pad(shape, pad, scale, quantize_to, packed_shape), x,
                      np.full(packed_shape, 99, np.uint8), host_target)
    padded = _run_kernel(reflection_pad(shape, pad, scale, quantize_to), x,
                         np.zeros((n, channels, out_h, out_w), np.uint8), host_target)
    # quantized first (by the kernel before it), the pad copies the bytes into the same layout
    quantized = padded[:, :, pad:pad + height * scale:scale, pad:pad + width * scale:scale]
    copied = _run_kernel(packed_reflection_pad(shape, pad, scale, quantize_to, packed_shape, quantized_input=True),
                         np.ascontiguousarray(quantized), np.full(packed_shape, 99, np.uint8), host_target)
    np.testing.assert_array_equal(copied, got)
    expected = np.full((n, packed_shape[1] * 4, out_h, out_w + extra_columns), 7, np.uint8)
    expected[:, :channels, :, :out_w] = padded
    expected = expected.reshape(n, packed_shape[1], 4, out_h, -1).transpose(0, 1, 3, 4, 2)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(padded)) > 100  # a real spread of values, not one clipped constant


def test_packed_pad_refuses_a_layout_too_small_for_the_padded_input():
    with pytest.raises(ValueError, match="does not hold"):
        packed_reflection_pad((1, 8, 6, 6), 1, 1, (0.1, 0.0), (1, 2, 8, 7, 4))  # 7 columns < 8
