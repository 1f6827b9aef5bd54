"""Weight-only low-bit linear layers for CPU inference: the one place that knows the packings (int8,
int4) and their kernels. The model files see only ``nn.Linear``-like modules.

``blip2.load(..., quantize="int8")``: every linear layer of the vision encoder, the Q-Former and the
language model int8 (per output channel). ``quantize="int4"``: the vision encoder's and the language
model's int4 (group-wise, ``group_size`` 128 by default), the Q-Former's and T5's encoder's int8 (see
``model.int4_layer``). The projection and the retrieval heads stay float. ``blip2 quantize SRC DST
--bits 8|4`` writes a checkpoint that holds the packed tensors (``checkpoint``), which ``blip2.load``
maps into memory without quantizing anything; with ``--calibration IMAGES`` its int4 codes are fitted
by GPTQ to the inputs the layers meet on those images (``calibrate``, ``gptq``) instead of rounded.

Kernels (``kernels``, ``csrc/lowbit_linear.c``): weights are stored in blocks of 16 outputs; the input
is quantized to int8 per row and block of 128 inputs (int8) or group (int4) and multiplied in integers
(AVX-512 VNNI or AVX2), each stored weight read once; measurements in ``bench/README.md``.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .calibrate import quantize_calibrated, save_calibrated
    from .int4 import DEFAULT_GROUP_SIZE, Int4Linear, pack_int4
    from .int8 import Int8Linear, fbgemm_available, pack_int8, quantize_weight
    from .model import METHODS, QUANTIZED_PARTS, QuantizedLinear, check_method, plan, quantize_model_

_EXPORTS = {
    "DEFAULT_GROUP_SIZE": ".int4",
    "Int4Linear": ".int4",
    "Int8Linear": ".int8",
    "METHODS": ".model",
    "QUANTIZED_PARTS": ".model",
    "QuantizedLinear": ".model",
    "check_method": ".model",
    "fbgemm_available": ".int8",
    "pack_int4": ".int4",
    "pack_int8": ".int8",
    "plan": ".model",
    "quantize_calibrated": ".calibrate",
    "quantize_model_": ".model",
    "quantize_weight": ".int8",
    "save_calibrated": ".calibrate",
}
__all__ = [
    "DEFAULT_GROUP_SIZE",
    "Int4Linear",
    "Int8Linear",
    "METHODS",
    "QUANTIZED_PARTS",
    "QuantizedLinear",
    "check_method",
    "fbgemm_available",
    "pack_int4",
    "pack_int8",
    "plan",
    "quantize_calibrated",
    "quantize_model_",
    "quantize_weight",
    "save_calibrated",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
