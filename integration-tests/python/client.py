"""A ClaudeCluster client in Python, from code generated out of the project's protos.

Usage: client.py GENERATED_DIR DRIVER_ADDRESS PROMPT
Submits PROMPT, streams the task's events and prints one line per event, then the final
status; exits 0 when the task completed. With CLAUDECLUSTER_API_KEY set, every call presents
it as `authorization: Bearer <key>`; with CLAUDECLUSTER_CA (a PEM file), it connects over TLS
trusting that CA.
"""
import os
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from claudecluster.v1 import driver_pb2, driver_pb2_grpc, types_pb2  # noqa: E402


def main() -> int:
    address, prompt = sys.argv[2], sys.argv[3]
    key = os.environ.get("CLAUDECLUSTER_API_KEY")
    metadata = [("authorization", f"Bearer {key}")] if key else []
    ca = os.environ.get("CLAUDECLUSTER_CA")
    if ca:
        with open(ca, "rb") as pem:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(pem.read()))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        driver = driver_pb2_grpc.DriverServiceStub(channel)
        try:
            task = driver.SubmitTask(
                driver_pb2.SubmitTaskRequest(spec=types_pb2.TaskSpec(prompt=prompt)),
                metadata=metadata,
            ).task
        except grpc.RpcError as error:
            print(f"refused: {error.code().name}: {error.details()}", file=sys.stderr)
            return 2
        print(f"submitted {task.task_id}")
        request = driver_pb2.StreamTaskEventsRequest(task_id=task.task_id)
        for response in driver.StreamTaskEvents(request, metadata=metadata):
            event = response.event
            kind = event.WhichOneof("kind")
            if kind == "status_change":
                print(f"{event.sequence} status {types_pb2.TaskStatus.Name(event.status_change.status)}")
            elif kind == "text":
                print(f"{event.sequence} text {event.text.text}")
            else:
                print(f"{event.sequence} {kind}")
        final = driver.GetTask(
            driver_pb2.GetTaskRequest(task_id=task.task_id), metadata=metadata
        ).task
        print(f"final {types_pb2.TaskStatus.Name(final.status)} cost {final.result.total_cost_usd:.6f}")
        return 0 if final.status == types_pb2.TASK_STATUS_COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
