"""memspace benchmarks: every figure measured beside a baseline in the same run."""
