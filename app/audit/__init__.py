"""Audit: tamper-evident history, point-in-time replay, drift checks and signed receipts.

docs/audit.md explains what is proved, against whom, and what is not.
"""
