"""`memspace remember | recall | get | forget | watch`: a space's memories from the shell, as
tables for people (rich) or JSON for scripts (`-o json`; `watch` writes one JSON object a line).

Embeddings are given as a JSON array (`--embedding '[0.1, 0.2]'`), a file (`@vec.json`, or a
numpy `@vec.npy`) or `-` (a JSON array on standard input). On a space with an embedding model
they are left out: `memspace remember TEXT` and `memspace recall --query TEXT` are embedded by
the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memspace_cli import connecting
from memspace_contract import client

CONTENT_WIDTH = 60


def add_parsers(commands: Any) -> None:
    remember = commands.add_parser(
        "remember", help="store a memory in a space", description="Store one memory."
    )
    remember.add_argument("content", help="the memory's text")
    _embedding_argument(
        remember,
        "--embedding",
        "the memory's embedding (default: none, the server embeds the text: a space with an "
        "embedding model)",
        required=False,
    )
    remember.add_argument("--id", dest="memory_id", metavar="ID", help="its ID (default: new)")
    _tags_argument(remember, "a tag of the memory")
    remember.add_argument("--confidence", type=float, metavar="F", help="0..1 (default 1)")
    remember.set_defaults(run=_runner(_remember))

    recall = commands.add_parser(
        "recall",
        help="the memories most similar to a cue, or matching a text query",
        description=(
            "Recall the k best memories: by cosine similarity to a cue (--mode vector, the "
            "default), by BM25 of a text query over content and tags (--mode keyword), or both "
            "fused by reciprocal rank (--mode hybrid: --cue and --query)."
        ),
    )
    _embedding_argument(recall, "--cue", "the cue embedding", required=False)
    recall.add_argument(
        "--query",
        metavar="TEXT",
        help="the text query (keyword and hybrid; on a space with an embedding model also "
        "vector, embedded by the server, with no --cue)",
    )
    recall.add_argument(
        "--mode",
        choices=("vector", "keyword", "hybrid"),
        default="vector",
        help="how to rank (default vector)",
    )
    recall.add_argument("-k", type=int, default=10, help="how many (1..1000, default 10)")
    recall.add_argument("--min-score", type=float, metavar="S", help="lowest score shown")
    _tags_argument(recall, "only memories with this tag (every one given must match)")
    recall.add_argument(
        "--embeddings", action="store_true", help="include the embeddings (-o json)"
    )
    recall.add_argument(
        "--exact", action="store_true", help="scan exactly, even where the space has an index"
    )
    recall.set_defaults(run=_runner(_recall))

    get = commands.add_parser("get", help="one memory", description="Show one memory by ID.")
    get.add_argument("memory_id", metavar="ID")
    get.add_argument("--embeddings", action="store_true", help="include the embedding")
    get.set_defaults(run=_runner(_get))

    forget = commands.add_parser(
        "forget", help="remove a memory", description="Remove one memory by ID."
    )
    forget.add_argument("memory_id", metavar="ID")
    forget.set_defaults(run=_runner(_forget))

    watch = commands.add_parser(
        "watch",
        help="follow a space's events",
        description=(
            "Print the space's events (remembered, forgotten) as they happen, resuming by "
            "itself after a shard restart or a dropped connection."
        ),
    )
    watch.add_argument(
        "--since", type=int, default=0, metavar="LSN", help="from this LSN (default: from now)"
    )
    watch.add_argument("--count", type=int, default=0, metavar="N", help="stop after N events")
    watch.set_defaults(run=_runner(_watch))

    for command in (remember, recall, get, forget, watch):
        connecting.add_arguments(command)


def _embedding_argument(
    command: argparse.ArgumentParser, flag: str, what: str, required: bool = True
) -> None:
    command.add_argument(
        flag,
        required=required,
        metavar="VECTOR",
        help=f"{what}: a JSON array, @FILE (.json or .npy) or - (JSON on standard input)",
    )


def _tags_argument(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help=f"{what}; repeatable"
    )


def embedding(text: str) -> Any:
    """The vector a flag names (ValueError saying what is wrong)."""
    if text == "-":
        source = sys.stdin.read()
    elif text.startswith("@"):
        path = Path(text[1:])
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        source = path.read_text()
    else:
        source = text
    try:
        values = json.loads(source)
    except json.JSONDecodeError as err:
        raise ValueError(f"an embedding must be a JSON array of numbers: {err}") from err
    if not isinstance(values, list):
        raise TypeError("an embedding must be a JSON array of numbers")
    return values


def tags(pairs: Sequence[str]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"a tag is KEY=VALUE, got {pair!r}")
        found[key] = value
    return found


def _memory_doc(memory: client.Memory, embeddings: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": memory.id,
        "content": memory.content,
        "confidence": memory.confidence,
        "tags": dict(memory.tags),
        "createdAt": memory.created_at.isoformat() if memory.created_at else None,
        "lastRecalledAt": memory.last_recalled_at.isoformat() if memory.last_recalled_at else None,
        "recallCount": memory.recall_count,
    }
    if embeddings and memory.embedding is not None:
        doc["embedding"] = memory.embedding.tolist()
    return doc


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= CONTENT_WIDTH else line[: CONTENT_WIDTH - 1] + "…"


def _tag_text(found: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(found.items()))


class Output:
    """Where a command's answer goes: rich tables, or JSON on standard output."""

    def __init__(self, form: str) -> None:
        from rich.console import Console  # noqa: PLC0415  # rich loads only when printing

        self.json = form == "json"
        self.console = Console(highlight=False, soft_wrap=True)

    def doc(self, value: Any, *, lines: bool = False) -> None:
        text = json.dumps(value, sort_keys=True, indent=None if lines else 2)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """IDs and numbers are never cut (a script or a person copies them); other cells may
        be."""
        from rich import box  # noqa: PLC0415
        from rich.table import Column, Table  # noqa: PLC0415

        whole = {"ID", "LSN", "SCORE", "TIER", "FIELD", "RESULT"}
        heads = [
            Column(
                name,
                no_wrap=name in whole,
                min_width=max([len(name), *(len(row[i]) for row in rows)])
                if name in whole
                else None,
            )
            for i, name in enumerate(columns)
        ]
        table = Table(*heads, box=box.SIMPLE_HEAD, pad_edge=False)
        for row in rows:
            table.add_row(*row)
        self.console.print(table)


def _remember(memspace: client.MemspaceClient, args: argparse.Namespace, out: Output) -> None:
    done = memspace.remember(
        args.content,
        embedding(args.embedding) if args.embedding is not None else None,
        memory_id=args.memory_id,
        tags=tags(args.tag),
        confidence=args.confidence,
    )
    if out.json:
        out.doc({"id": done.id, "lsn": done.lsn})
    else:
        out.table(("ID", "LSN"), [(done.id, str(done.lsn))])


def _recall(memspace: client.MemspaceClient, args: argparse.Namespace, out: Output) -> None:
    if args.cue is None and not args.query:
        raise ValueError("recall needs --cue VECTOR or --query TEXT")
    hits = memspace.recall(
        embedding(args.cue) if args.cue is not None else None,
        args.k,
        min_score=args.min_score,
        tags=tags(args.tag),
        include_embeddings=args.embeddings,
        exact=args.exact,
        query=args.query,
        mode=args.mode,
    )
    if out.json:
        out.doc(
            [
                {"score": h.score, "tier": h.tier, "memory": _memory_doc(h.memory, args.embeddings)}
                for h in hits
            ]
        )
        return
    rows = [
        (f"{h.score:.4f}", h.memory.id, h.tier, _short(h.memory.content), _tag_text(h.memory.tags))
        for h in hits
    ]
    out.table(("SCORE", "ID", "TIER", "CONTENT", "TAGS"), rows)


def _get(memspace: client.MemspaceClient, args: argparse.Namespace, out: Output) -> None:
    memory = memspace.get(args.memory_id)
    doc = _memory_doc(memory, args.embeddings)
    if out.json:
        out.doc(doc)
        return
    rows = [(key, str(value)) for key, value in doc.items() if key != "embedding"]
    if args.embeddings and memory.embedding is not None:
        rows.append(("embedding", np.array2string(memory.embedding, threshold=8)))
    out.table(("FIELD", "VALUE"), rows)


def _forget(memspace: client.MemspaceClient, args: argparse.Namespace, out: Output) -> None:
    gone = memspace.forget(args.memory_id)
    if out.json:
        out.doc({"id": args.memory_id, "forgotten": gone.forgotten, "lsn": gone.lsn})
    else:
        said = "forgotten" if gone else "no such memory"
        out.table(("ID", "RESULT", "LSN"), [(args.memory_id, said, str(gone.lsn))])


def _watch(memspace: client.MemspaceClient, args: argparse.Namespace, out: Output) -> None:
    if not out.json:
        out.console.print(f"{'LSN':>10}  {'EVENT':<10}  {'AT':<32}  ID", style="bold")
    for seen, event in enumerate(memspace.watch(since_lsn=args.since), start=1):
        at = event.at.isoformat() if event.at else ""
        if out.json:
            doc = {"lsn": event.lsn, "event": event.kind, "id": event.id, "at": at or None}
            out.doc({**doc, "space": event.space}, lines=True)
        else:
            out.console.print(f"{event.lsn:>10}  {event.kind:<10}  {at:<32}  {event.id}")
        if args.count and seen >= args.count:
            return


Command = Callable[[client.MemspaceClient, argparse.Namespace, Output], None]


def _runner(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import grpc  # noqa: PLC0415

        name = f"memspace {args.command}"
        try:
            credentials = connecting.credentials(args)
            out = Output(args.output)
            with client.MemspaceClient(credentials, timeout=args.timeout) as memspace:
                command(memspace, args, out)
        except grpc.RpcError as err:
            code = err.code()
            print(f"{name}: {code.name}: {err.details()}", file=sys.stderr)
            return 1
        except (ValueError, TypeError, OSError) as err:  # credentials, a bad vector or tag, a file
            print(f"{name}: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        return 0

    return run
