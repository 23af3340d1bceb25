"""The user's journey on a real node: the chart installed with the image built from the Dockerfile,
tenants' pods calling their shards through Services, and the faults a cluster brings."""
