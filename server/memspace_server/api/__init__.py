"""The gRPC API of the memspace server (memspace.v1 on grpc.aio): space routing and auth, the
error table, servicers, metrics, serving and drain. Protobuf stops here: nothing below this
package (the storage engine) ever sees a generated message or imports grpc."""
