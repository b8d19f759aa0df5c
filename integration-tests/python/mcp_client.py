"""Drives `claudecluster mcp` with the official Python MCP SDK.

Usage:
  mcp_client.py stdio CLAUDECLUSTER_BIN DRIVER_ADDRESS
  mcp_client.py http URL

Runs one scenario (initialize, list tools, spawn, wait, result, cancel, list, a session with
two messages, bad calls) and prints one JSON object per step, for the test to check.
"""
import asyncio
import json
import os
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


def out(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def data(result):
    if result.structured_content is not None:
        return result.structured_content
    text = result.content[0].text if result.content else ""
    try:
        return json.loads(text)
    except ValueError:
        return {"text": text}


async def call(session, name, arguments):
    started = time.monotonic()
    result = await session.call_tool(name, arguments)
    elapsed_ms = (time.monotonic() - started) * 1000
    return bool(result.is_error), data(result), elapsed_ms


async def scenario(session):
    init = await session.initialize()
    out("initialize", server=init.server_info.name)

    tools = await session.list_tools()
    spawn = next(t for t in tools.tools if t.name == "spawn_claude_container")
    out("tools", names=sorted(t.name for t in tools.tools),
        spawn_properties=sorted(spawn.input_schema.get("properties", {})),
        spawn_required=spawn.input_schema.get("required", []))

    error, spawned, spawn_ms = await call(session, "spawn_claude_container",
                                          {"task": "WRITE mcp-task.txt hello from mcp", "sessionTimeout": 120,
                                           "allowedTools": ["Write"]})
    out("spawn", is_error=error, spawn_ms=spawn_ms, **spawned)
    task_id = spawned["taskId"]

    error, waited, _ = await call(session, "wait_for_task", {"taskId": task_id, "timeoutSeconds": 45})
    out("wait", is_error=error, **waited)

    error, result, _ = await call(session, "get_task_result", {"taskId": task_id})
    out("result", is_error=error, **result)

    error, hanging, _ = await call(session, "spawn_claude_container", {"task": "HANG"})
    error, cancelled, _ = await call(session, "cancel_task", {"taskId": hanging["taskId"], "reason": "not needed"})
    out("cancel", is_error=error, **cancelled)

    error, failing, _ = await call(session, "spawn_claude_container", {"task": "ERROR 529"})
    await call(session, "wait_for_task", {"taskId": failing["taskId"]})
    error, failed_result, _ = await call(session, "get_task_result", {"taskId": failing["taskId"]})
    out("failed_result", is_error=error, **failed_result)

    error, listed, _ = await call(session, "list_tasks", {"mine": True})
    out("list_mine", is_error=error, task_ids=[t["taskId"] for t in listed.get("tasks", [])], **listed)

    error, created, _ = await call(session, "create_session", {"allowedTools": ["Write", "Bash"]})
    out("create_session", is_error=error, **created)
    session_id = created["sessionId"]
    error, first, _ = await call(session, "send_message",
                                 {"sessionId": session_id, "text": "WRITE mcp.txt from the session", "timeoutSeconds": 45})
    out("message_1", is_error=error, **first)
    error, second, _ = await call(session, "send_message",
                                  {"sessionId": session_id, "text": "BASH cat mcp.txt", "timeoutSeconds": 45})
    out("message_2", is_error=error, **second)
    error, closed, _ = await call(session, "close_session", {"sessionId": session_id})
    out("close_session", is_error=error, **closed)

    error, missing, _ = await call(session, "get_task_status", {"taskId": "no-such-task"})
    out("missing_task", is_error=error, **missing)
    # Arguments that do not fit the schema: an error the model can read and correct.
    error, unknown, _ = await call(session, "get_task_status", {"taskId": task_id, "bogus": 1})
    out("unknown_argument", is_error=error, **unknown)
    # A call the server cannot route at all: a protocol error.
    try:
        await session.call_tool("no_such_tool", {})
        out("unknown_tool", protocol_error=False)
    except MCPError as err:
        out("unknown_tool", protocol_error=True, message=str(err))

    error, status, _ = await call(session, "cluster_status", {})
    out("cluster_status", is_error=error, **status)

    # The server's added latency per call: the same lookup, many times.
    timings = []
    for _ in range(30):
        _, _, elapsed = await call(session, "get_task_status", {"taskId": task_id})
        timings.append(elapsed)
    timings.sort()
    out("latency", median_ms=timings[len(timings) // 2])


async def main():
    if sys.argv[1] == "stdio":
        params = StdioServerParameters(
            command=sys.argv[2],
            args=["mcp", "--driver", sys.argv[3]],
            env={**os.environ, "CLAUDE_CODE_SESSION_ID": "primary-session-1"},
        )
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await scenario(session)
    else:
        async with streamable_http_client(sys.argv[2]) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await scenario(session)


if __name__ == "__main__":
    asyncio.run(main())
