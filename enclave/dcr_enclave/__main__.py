"""``python -m dcr_enclave`` runs the same CLI as ``dcr`` with only this distribution installed."""

from .cli import main

raise SystemExit(main())
