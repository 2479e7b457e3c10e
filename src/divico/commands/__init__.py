"""Sub-commands of the `divico` CLI, discovered by :func:`divico.cli.build_parser`."""
