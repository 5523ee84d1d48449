"""Handlers that look fixed and are not: each exists to prove that some attack rejects it."""
