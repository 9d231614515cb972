"""Writes the benchmark batch: the published receivedMessage, agent message (sentAllMessage) and
updatedWorkflowStep examples in one compact body, under the receivedMessage example's token.

Each event gets a first member "bench_n":"@N@"; the wrk script replaces @N@ per request so that
every event is unique and the dedup window does real work instead of short-cutting it.
Usage: python3 batch.py FIXTURES_DIR OUT_FILE; prints the token, then the number of events."""
import json
import sys

fixtures, out = sys.argv[1], sys.argv[2]
TYPES = ["receivedMessage", "sentAllMessage", "updatedWorkflowStep"]


def load(name):
    with open(f"{fixtures}/{name}.json", encoding="utf-8") as f:
        return json.load(f)


first = load(TYPES[0])
messages = {}
for name in TYPES:
    for event_type, events in load(name)["messages"].items():
        messages.setdefault(event_type, []).extend({"bench_n": "@N@", **e} for e in events)
batch = {"time": first["time"], "token": first["token"], "messages": messages}
with open(out, "w", encoding="utf-8") as f:
    f.write(json.dumps(batch, separators=(",", ":"), ensure_ascii=False))
print(first["token"])
print(sum(len(v) for v in messages.values()))
