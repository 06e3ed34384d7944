"""The running agent: command line, composition, standalone mode and the HTTP API."""
