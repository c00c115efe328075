"""DCR's trusted computing base: the code that runs in the enclave and the code that verifies it."""

__version__ = "0.1.0"
