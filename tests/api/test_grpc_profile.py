"""The gRPC profile (`benchmarks/grpc_profile.py`) splits what it samples as it says: a real
`memspace serve` and the floor server, sampled by py-spy under load, each call's loop-thread time
divided into the server's own code and gRPC with the event loop."""

from __future__ import annotations

from pathlib import Path

from benchmarks import grpc_profile

LOOP = "run (memspace_server/api/loops.py:15);Runner.run (asyncio/runners.py:118)"
HANDLE = "Edge._unary.<locals>.handle (memspace_server/api/handling.py:263)"
RAW = "\n".join(
    [
        f"thread (11): MainThread;<module> (memspace_cli/main.py:78);{LOOP} 7",
        f"thread (11): MainThread;{LOOP};{HANDLE};Space.recall (memspace_server/storage/"
        "spaces.py:591) 3",
        f"thread (11): MainThread;{LOOP};Space.recall (memspace_server/storage/spaces.py:609);"
        "wait (asyncio/tasks.py:428) 2",
        "thread (12): memspace-wal_0;Thread.run (threading.py:982);"
        "Wal._write (memspace_server/storage/wal.py:873) 5",
        "thread (13): memspace-wal_1;Thread.run (threading.py:982) 1",
        "thread (14): Thread-1 (_poll_wrapper);Thread.run (threading.py:982) 4",
        "",
    ]
)


def test_samples_count_only_what_the_loop_runs_as_the_servers_own_code() -> None:
    samples = grpc_profile.Samples(grpc_profile.OWN_CODE["memspace"])
    samples.add(RAW)
    # The entry point (loops.run) is below the loop's dispatch in every stack: not the call's.
    assert samples.loop == {grpc_profile.LOOP: 7, grpc_profile.OWN: 5}
    assert samples.functions == {
        "Edge._unary.<locals>.handle (memspace_server/api/handling.py)": 3,
        "Space.recall (memspace_server/storage/spaces.py)": 5,  # two lines, one function
    }
    assert samples.threads == {"memspace-wal": 6, "grpc-poller": 4}


async def test_the_profile_splits_each_servers_loop_time(tmp_path: Path) -> None:
    found = await grpc_profile.profile(("recall",), rounds=1, seconds=1.0, root=tmp_path, top=50)
    ours, floor = found["recall memspace"], found["recall floor"]
    for side in (ours, floor):
        assert isinstance(side["calls_per_s"], int)
        assert side["calls_per_s"] > 0
        assert isinstance(side["cpu_us_per_call"], float)
        assert side["cpu_us_per_call"] > 0
        split = side["loop_thread"]
        assert isinstance(split, dict)
        assert split[grpc_profile.LOOP] > 0
        assert split[grpc_profile.OWN] > 0
        busy = side["loop_thread_busy_us_per_call"]
        assert isinstance(busy, float)
        assert abs(sum(split.values()) - busy) <= 0.2  # rounding of each part
        assert "grpc-poller" in side["other_threads_busy_us_per_call"]  # type: ignore[operator]
    functions = ours["own_functions_us_per_call"]
    assert isinstance(functions, dict)
    assert "MemoryServicer.recall (memspace_server/api/servicers.py)" in functions
    assert not any("loops.py" in name for name in functions)
    floor_functions = floor["own_functions_us_per_call"]
    assert isinstance(floor_functions, dict)
    assert "Floor.recall (benchmarks/grpc_floor.py)" in floor_functions
    assert all("memspace_server" not in name for name in floor_functions)
    assert "recall memspace" in grpc_profile.table(found)


async def test_the_fanout_profile_shares_a_core_between_the_server_and_its_subscribers(
    tmp_path: Path,
) -> None:
    found = await grpc_profile.fanout(seconds=1.0, root=tmp_path, subscribers=50, top=50)
    assert found["subscribers"] == 50
    for key in ("events_per_s", "batches", "server_cores", "loop_thread_cores"):
        value = found[key]
        assert isinstance(value, int | float)
        assert value > 0, key
    subscribers = found["subscribers_cores"]
    assert isinstance(subscribers, float)
    assert subscribers > 0
    split = found["loop_thread_busy"]
    assert isinstance(split, dict)
    assert split[grpc_profile.LOOP] > 0
    assert split[grpc_profile.OWN] > 0
    assert sum(split.values()) <= 1.05  # shares of the sampled time of one thread
    functions = found["own_functions"]
    assert isinstance(functions, dict)
    # The streams' own code is sampled as such (the subscribers took events meanwhile).
    assert "MemoryServicer.subscribe (memspace_server/api/servicers.py)" in functions
    assert "fan-out to 50 subscribers" in grpc_profile.fanout_table(found)
