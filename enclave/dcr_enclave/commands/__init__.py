"""One module per ``dcr`` subcommand; each has ``register(subparsers)``."""
