"""The committed protobuf code is exactly what contract/proto/generate.py makes of the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from memspace_contract.v1 import memspace_pb2, memspace_pb2_grpc
from memspace_contract.v1 import memspace_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_proto_source() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "contract" / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout


def test_generated_modules_import_as_memspace_contract_v1() -> None:
    assert memspace_pb2.DESCRIPTOR.package == "memspace.v1"
    assert memspace_pb2.Memory.__module__ == "memspace_contract.v1.memspace_pb2"
    assert vars(memspace_pb2_grpc)["memspace_dot_v1_dot_memspace__pb2"] is memspace_pb2


def test_contract_field_numbers_are_those_of_the_design() -> None:
    design: dict[str, dict[str, int]] = {
        "Memory": {
            "id": 1,
            "content": 2,
            "embedding": 3,
            "confidence": 4,
            "tags": 5,
            "created_at": 6,
            "last_recalled_at": 7,
            "recall_count": 8,
        },
        "RememberRequest": {"space": 1, "memory": 2},
        "RememberResponse": {"id": 1, "lsn": 2},
        "RememberBatchResponse": {"count": 1, "last_lsn": 2},
        "RecallRequest": {
            "space": 1,
            "cue": 2,
            "k": 3,
            "min_score": 4,
            "tags": 5,
            "include_embeddings": 6,
        },
        "RecallHit": {"memory": 1, "score": 2, "tier": 3},
        "RecallResponse": {"hits": 1},
        "GetRequest": {"space": 1, "id": 2},
        "GetResponse": {"memory": 1},
        "ForgetRequest": {"space": 1, "id": 2},
        "ForgetResponse": {"forgotten": 1, "lsn": 2},
        "ConsolidateRequest": {"space": 1},
        "ConsolidateResponse": {"consolidated": 1},
        "SubscribeRequest": {"space": 1, "since_lsn": 2},
        "MemoryEvent": {"space": 1, "type": 2, "id": 3, "lsn": 4, "at": 5},
        "CreateSpaceRequest": {"space": 1, "embedding_dim": 2},
        "Space": {"space": 1, "embedding_dim": 2, "state": 3},
        "DeleteSpaceRequest": {"space": 1},
        "DeleteSpaceResponse": {"deleted": 1},
        "ListSpacesRequest": {},
        "ListSpacesResponse": {"spaces": 1},
        "HealthRequest": {"space": 1},
        "SpaceHealth": {
            "space": 1,
            "state": 2,
            "memories": 3,
            "pressure": 4,
            "wal_lag_ms": 5,
            "consolidation_rate": 6,
            "tier_memories": 7,
            "disk_bytes": 8,
        },
        "HealthResponse": {"status": 1, "spaces": 2},
    }
    for message, fields in design.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        for name, number in fields.items():
            assert descriptor.fields_by_name[name].number == number, (message, name)
    assert dict(pb.EventType.items()) == {
        "EVENT_TYPE_UNSPECIFIED": 0,
        "EVENT_TYPE_REMEMBERED": 1,
        "EVENT_TYPE_FORGOTTEN": 2,
    }
    rpcs = {
        service.name: [m.name for m in service.methods]
        for service in pb.DESCRIPTOR.services_by_name.values()
    }
    assert rpcs == {
        "MemoryService": [
            "Remember",
            "RememberBatch",
            "Recall",
            "Get",
            "Forget",
            "Subscribe",
            "Consolidate",
        ],
        # Additions: ApplyIndexEntry (the operator's direct path into a shard's index) and the
        # backup calls.
        "SpaceService": [
            "CreateSpace",
            "DeleteSpace",
            "ListSpaces",
            "Health",
            "ApplyIndexEntry",
            "BackupSpace",
            "RestoreSpace",
            "DeleteBackup",
        ],
    }
