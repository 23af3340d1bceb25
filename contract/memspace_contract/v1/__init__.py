"""Generated code of the memspace.v1 gRPC API (see server/proto/generate.py)."""
