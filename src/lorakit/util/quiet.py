"""Silence known-benign log noise of optional dependencies, and nothing else.

With torchao installed, ``transformers`` imports it on every model load, and torchao logs a warning for each of
its CUDA-only extensions a CPU machine cannot load, while torch logs a deprecation notice for each enum torchao
registers; bitsandbytes' CPU backend logs that an optional kernel package is missing, and its int8 matmul logs
the same cast on every call. None of these is actionable by a lorakit user; each is matched by its exact text
(other records of those loggers pass), and the int8 cast notice is shown once.
"""

from __future__ import annotations

import logging

#: ``logger name -> (substring, show the first one)``: the records dropped.
_NOISE: dict[str, tuple[str, bool]] = {
    "torchao": ("Failed to load", False),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported", False),
    "bitsandbytes.backends.cpu.ops": ("kernels-community", False),
    "bitsandbytes.autograd._functions": ("inputs will be cast from", True),
}


class _Drop(logging.Filter):
    def __init__(self, text: str, first: bool) -> None:
        super().__init__()
        self.text, self.first = text, first

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in str(record.msg):
            return True
        if self.first:
            self.first = False
            return True
        return False


def silence_dependency_noise() -> None:
    """Install the filters (idempotent)."""
    for name, (text, first) in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(text, first))


silence_dependency_noise()  # on import: lorakit's __init__ imports this module first
