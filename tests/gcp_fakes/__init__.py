"""Loopback fakes of the Google services the Confidential Space path uses (see each module)."""
