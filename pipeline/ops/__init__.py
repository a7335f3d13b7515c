"""Operator tools on a running lake: `audit` (accounting), `doctor` (set-up checks) and `replay` (quarantine)."""
