"""kubectl tracekeeper: read a TraceProbe's output with your own kubectl credentials."""
