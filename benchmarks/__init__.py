"""fastsave benchmarks (run only when named: see README.md)."""
