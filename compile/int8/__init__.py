"""int8 QDQ models as integer code: one matcher of QDQ convolutions (`match`), the CPU lowering to
hand-scheduled integer kernels (`lowering`, with `intrinsics`, `amx`, `winograd`), the fixed-point
lowering for microcontrollers (`fixed_point`), and ONNX Runtime's QOperator format read as QDQ
(`qoperator`)."""
