"""The memspace server: per-space storage engine (WAL, tiers, recall), the space registry and
the gRPC API on top. It knows nothing of Kubernetes: it reads a directory of volumes and an
index of spaces."""
