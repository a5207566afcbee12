"""FP8 (e4m3) to float16 in registers, for kernels that read FP8 weights or an FP8 KV cache.

e4m3's bits `s eeee mmm`, moved to float16's `s 0eeee mmm0000000`, are the same number times
2^-8 (the exponent biases are 7 and 15), subnormals and zero included: five integer
instructions per pair of values, where the conversion Triton emits for e4m3 -> bf16 goes
through float16 and float32 on the conversion units. Paged attention over an FP8 cache ran 10%
faster with it (H200, B=256; docs/benchmarks.md, "Quantization"). Callers fold the 2^8 into a
scale they apply anyway.
"""

from __future__ import annotations

import triton
import triton.language as tl

E4M3_AS_FP16_SCALE = 256.0  # what e4m3_as_fp16's result is multiplied by to give the e4m3 value


@triton.jit
def e4m3_as_fp16(x, USE_ASM: tl.constexpr):
    """x (float8e4nv) as float16, divided by 256: exactly. USE_ASM off (the Triton interpreter)
    computes the same through float32."""
    if USE_ASM:
        # Four bytes b0..b3 in a register; prmt spreads two of them to bits 8-15 and 24-31, so
        # each sign sits on its float16 sign bit and a shift by one lines up exponent and mantissa.
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, u;
            prmt.b32 t, $2, 0, 0x1404;
            shr.b32 u, t, 1;
            and.b32 u, u, 0x3F803F80;
            and.b32 t, t, 0x80008000;
            or.b32 $0, t, u;
            prmt.b32 t, $2, 0, 0x3424;
            shr.b32 u, t, 1;
            and.b32 u, u, 0x3F803F80;
            and.b32 t, t, 0x80008000;
            or.b32 $1, t, u;
            }""",
            constraints="=r,=r,r", args=[x.to(tl.uint8, bitcast=True)], dtype=tl.float16,
            is_pure=True, pack=4)
    return (x.to(tl.float32) * (1.0 / 256.0)).to(tl.float16)
