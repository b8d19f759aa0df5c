// SubmitTask then GetTask of the new task, at a constant rate: the driver's request path with
// its store. Run by `cluster-bench driver` at rising rates (RATE, per second, for DURATION).
import grpc from 'k6/net/grpc';
import { check } from 'k6';

const client = new grpc.Client();
client.load([__ENV.PROTO_DIR], 'claudecluster/v1/driver.proto');

export const options = {
  scenarios: {
    steady: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE),
      timeUnit: '1s',
      duration: __ENV.DURATION || '5s',
      preAllocatedVUs: 64,
      maxVUs: 256,
    },
  },
  summaryTrendStats: ['med', 'p(99)', 'max'],
};

let connected = false;

export default function () {
  if (!connected) {
    client.connect(__ENV.DRIVER, { plaintext: true });
    connected = true;
  }
  const submitted = client.invoke('claudecluster.v1.DriverService/SubmitTask', {
    spec: { prompt: 'EVENTS 1' },
  });
  check(submitted, { 'submit ok': (r) => r && r.status === grpc.StatusOK });
  if (!submitted || submitted.status !== grpc.StatusOK) {
    return;
  }
  const got = client.invoke('claudecluster.v1.DriverService/GetTask', {
    taskId: submitted.message.task.taskId,
  });
  check(got, { 'get ok': (r) => r && r.status === grpc.StatusOK });
}
