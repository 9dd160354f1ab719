"""meshbake runtime: the training program copied into every bundle (torch + transformers only)."""
import logging as _logging


class _QuietTorchao(_logging.Filter):
    """With torchao installed (the qlora extra, runtime/quant.py), transformers imports it for its
    quantizers in every model build, and that import logs one warning per CUDA kernel library torchao
    cannot load on this machine and torch one per Enum torchao registers with torch.compile: four
    lines of noise in every meshbake command. Exactly those records are dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Failed to load ") or "register_constant()" in msg)


for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).addFilter(_QuietTorchao())
