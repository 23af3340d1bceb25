"""The storage engine of one memory space and the registry of many: WAL, tiers, recall, feeds.
It must not import grpc, protobuf or anything of the API layer."""
