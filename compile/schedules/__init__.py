"""The CPU schedules every build applies where no tuning record does: `default` (float glue, reductions,
what is left unscheduled), `conv` (register-tiled direct fp32 convolutions) and `winograd` (fp32
Winograd F(4x4, 3x3))."""
