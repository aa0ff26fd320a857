"""The benchmark instrument of portable-ckpt: ``python -m benchmarks`` (see benchmarks/README.md)."""
