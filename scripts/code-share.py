#!/usr/bin/env python3
"""How much of the worker's code both execution modes share.

Counts non-blank, non-comment lines of services/worker/src outside `#[cfg(test)]` modules.
Mode-specific code is what only one provider uses: execution/process.rs and execution/signal.rs
(process pool) and execution/container.rs (container mode); everything else in the worker
(runtime, supervision, parsing and events, command line, warm pools, workspaces, the RPC
service and the scheduler link) serves both.
"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent / "services" / "worker" / "src"
SPECIFIC = {
    "execution/process.rs": "process pool",
    "execution/signal.rs": "process pool",
    "execution/container.rs": "container mode",
    # Sessions run only in container mode; their code is written against the provider
    # interface, but they are a feature of their own, so they count on neither side.
    "session.rs": "sessions",
}


def code_lines(path: pathlib.Path) -> int:
    text = path.read_text()
    # Drop unit-test modules: from `#[cfg(test)]` to the end of the file (they come last).
    text = re.split(r"(?m)^#\[cfg\(test\)\]", text)[0]
    count = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("//"):
            count += 1
    return count


shared = specific = 0
rows = []
for path in sorted(ROOT.rglob("*.rs")):
    name = str(path.relative_to(ROOT))
    lines = code_lines(path)
    kind = SPECIFIC.get(name, "shared")
    rows.append((name, kind, lines))
    if kind == "shared":
        shared += lines
    elif kind != "sessions":
        specific += lines
for name, kind, lines in rows:
    print(f"{lines:6}  {kind:14}  {name}")
total = shared + specific
print(f"worker, without sessions: shared {shared} of {total} lines: {100 * shared / total:.1f} %")

# Every other service and library serves both modes alike.
others = sum(
    code_lines(path)
    for folder in ("services/driver", "services/scheduler", "services/mcp", "services/cli", "libs")
    for path in (ROOT.parent.parent.parent / folder).rglob("src/**/*.rs")
)
everything = total + others
print(
    f"all service code: shared {shared + others} of {everything} lines: "
    f"{100 * (shared + others) / everything:.1f} %"
)
