"""The testbed's commands, registered with the ``divico`` CLI through the ``divico.commands`` entry points."""
