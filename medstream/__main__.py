"""`python -m medstream` runs the CLI (used by the supervisor to start its children)."""

from medstream.cli import app

app(prog_name="medstream")
