"""The memspace operator: reconciles MemorySpace resources into volumes, credentials, index
entries and server shards. It talks to the server only through memspace_contract."""
