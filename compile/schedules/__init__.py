"""The CPU schedules every build applies where no tuning record does: `default` (float glue, reductions,
what is left unscheduled), `conv` (register-tiled direct fp32 convolutions) and `winograd` (fp32
Winograd F(4x4, 3x3))."""

from tvm import tirx


def is_scheduled(func: tirx.PrimFunc) -> bool:
    """Whether a kernel arrived scheduled (hand-written, or tuned): nothing schedules it again."""
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))
