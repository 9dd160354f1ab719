"""meshbake runtime: the training program copied into every bundle (torch + transformers only)."""
