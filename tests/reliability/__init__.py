"""Reliability and security suite: crashes, disk faults, bad input, load and tenant isolation
under stress, against real `memspace serve` processes. `MEMSPACE_SOAK=1` runs the long variants."""
