"""Command-line helpers (``python -m fedray.tools.<name>``)."""
