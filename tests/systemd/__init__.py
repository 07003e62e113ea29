"""The units in contrib/systemd under a real systemd as PID 1, in a container:
`make test-systemd` (python -m tests.systemd), not part of `make test`."""
