"""The small contract shared by the memspace server and operator: space IDs, the spaces index
format, the gRPC API and its client. It imports neither the server nor the operator."""
