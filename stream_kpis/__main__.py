"""``python -m stream_kpis`` runs the command line."""

from .cli import main

main()
