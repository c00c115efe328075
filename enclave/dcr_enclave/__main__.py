"""``python -m dcr_enclave`` runs the same CLI as ``dcr`` with only this distribution installed."""

from dcr_enclave.commands.main import main

raise SystemExit(main())
