"""Generated code of the memspace.v1 gRPC API (see contract/proto/generate.py)."""
