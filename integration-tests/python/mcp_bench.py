"""MCP figures, all from one Python process so that client costs are alike.

Usage: mcp_bench.py CLAUDECLUSTER_BIN DRIVER_ADDRESS GENERATED_STUBS_DIR [SPAWNS CALLS]
Prints JSON: the times (ms) spawn_claude_container calls take to return with the child running,
and the times of get_task_status through MCP and of GetTask on the driver directly.
"""
import asyncio
import json
import sys
import time

sys.path.insert(0, sys.argv[3])

import grpc  # noqa: E402
from claudecluster.v1 import driver_pb2, driver_pb2_grpc  # noqa: E402
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402


async def main():
    binary, driver_address = sys.argv[1], sys.argv[2]
    spawn_count, call_count = (int(n) for n in (sys.argv[4:6] or ["10", "200"]))
    params = StdioServerParameters(command=binary, args=["mcp", "--driver", driver_address])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            spawns = []
            task_id = None
            for _ in range(spawn_count):
                started = time.monotonic()
                result = await session.call_tool("spawn_claude_container", {"task": "hello bench"})
                spawns.append((time.monotonic() - started) * 1000)
                task = result.structured_content
                assert task["status"] == "running", task
                task_id = task["taskId"]
                await session.call_tool("wait_for_task", {"taskId": task_id})
            through_mcp = []
            for _ in range(call_count):
                started = time.monotonic()
                await session.call_tool("get_task_status", {"taskId": task_id})
                through_mcp.append((time.monotonic() - started) * 1000)
    with grpc.insecure_channel(driver_address) as channel:
        driver = driver_pb2_grpc.DriverServiceStub(channel)
        direct = []
        for _ in range(call_count):
            started = time.monotonic()
            driver.GetTask(driver_pb2.GetTaskRequest(task_id=task_id))
            direct.append((time.monotonic() - started) * 1000)
    print(json.dumps({
        "spawn_ms": spawns,
        "mcp_call_ms": through_mcp,
        "direct_call_ms": direct,
    }))


asyncio.run(main())
