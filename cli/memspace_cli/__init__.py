"""The `memspace` command: `serve` (the gRPC server), `status` (health of a server's spaces) and
`operator`. It imports the server and the operator lazily, only for the subcommand run."""
