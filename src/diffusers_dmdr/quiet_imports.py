"""Import bitsandbytes without the Hub request it makes on some CPUs.

bitsandbytes >= 0.50, imported on a CPU with AVX512-BF16 while the `kernels` package is installed (transformers >= 5.25
depends on it), asks the Hub for `kernels-community/quantization-bitsandbytes` to get a fused 4-bit CPU matmul, and logs
"Failed to load CPU gemm_4bit_forward from kernels-community" when it cannot. peft and diffusers import bitsandbytes
whenever it is installed, so without this every process that trains or exports would contact the Hub (when
`HF_HUB_OFFLINE` is unset) and print that line, offline or not. This project uses bitsandbytes only for 8-bit AdamW,
which needs no downloaded kernel.

`import_bitsandbytes_offline` imports bitsandbytes once, early, with huggingface_hub's offline switch on for the
duration of that import only, and drops the two log lines that import then writes. Set `DMDR_ALLOW_KERNEL_DOWNLOADS=1` to let bitsandbytes
fetch its CPU kernel as it would by itself (you then also get its 4-bit CPU matmul).
"""

import importlib.util
import logging
import os
import sys


ALLOW_ENV = "DMDR_ALLOW_KERNEL_DOWNLOADS"
# The lines this import logs with the Hub switched off: (logger, start of the message). bitsandbytes' CPU backend
# reports the missing kernel; kernels reports that it cannot check the publisher offline.
NOTICES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),
)


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_bitsandbytes_offline() -> bool:
    """Import bitsandbytes with the Hub switched off for that import; returns whether this call imported it.

    A no-op when bitsandbytes is already imported or not installed, when `kernels` is not installed (then
    bitsandbytes asks nothing of the Hub), or when the user set `DMDR_ALLOW_KERNEL_DOWNLOADS=1`.
    """
    if "bitsandbytes" in sys.modules or os.environ.get(ALLOW_ENV) == "1":
        return False
    if not (_installed("bitsandbytes") and _installed("kernels")):
        return False
    # kernels reads huggingface_hub.constants.HF_HUB_OFFLINE when it resolves a kernel (kernels/_internals/load.py):
    # a public module constant, switched for the length of one import. tests/test_quiet_imports.py fails if either
    # library stops reading it there.
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    filters = [(logging.getLogger(name), _DropNotice(prefix)) for name, prefix in NOTICES]
    constants.HF_HUB_OFFLINE = True
    for logger, notice_filter in filters:
        logger.addFilter(notice_filter)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken bitsandbytes install must surface where it is used (--use_8bit_adam), not here
        return False
    finally:
        constants.HF_HUB_OFFLINE = previous
        for logger, notice_filter in filters:
            logger.removeFilter(notice_filter)
    return True


# torchao (the `quant` extra, `--base_quantization torchao_int8`) is imported by diffusers and peft whenever it is
# installed, and on a CPU-only torch that import logs five lines that concern nothing this project does: its wheel's
# CUDA kernels (`_C_mxfp8`, `_C_cutlass_90a`) cannot load without CUDA (int8 weight-only needs none of them); torch
# 2.13 tells libraries that registering enums with pytree is deprecated; diffusers cannot register torchao's old
# tensor classes for `torch.load` of pickled torchao checkpoints, which this project never loads (safetensors only).
# (logger, start of the message, drop only on a CPU-only torch build)
TORCHAO_NOTICES = (
    ("torchao", "Failed to load ", True),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported", False),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects", False),
)


def quiet_torchao_notices() -> bool:
    """Drop the import notices of `TORCHAO_NOTICES` (filters on those loggers, matching those messages only); returns
    whether filters were added. A no-op when torchao is not installed or already imported; the CUDA-kernel notice is
    kept on a CUDA build of torch, where a kernel that fails to load is worth reading."""
    if "torchao" in sys.modules or not _installed("torchao"):
        return False
    import torch

    cpu_only = torch.version.cuda is None
    for name, prefix, only_without_cuda in TORCHAO_NOTICES:
        if cpu_only or not only_without_cuda:
            logging.getLogger(name).addFilter(_DropNotice(prefix))
    return True
