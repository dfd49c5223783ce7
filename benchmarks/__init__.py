"""tritonbn benchmark suite (issue #4): `python -m benchmarks.bench`, `python -m benchmarks.train_check`,
`benchmarks/gpu_check.sh OUTDIR`. Importing this package does no work and touches no device."""
