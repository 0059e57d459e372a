"""The error every layer raises for a problem in the user's input (a path, a setting, a file).

The command line prints it as one clear line and exits with code 2 (:func:`engine.cli.main`);
the GUI shows it in a message box. It lives here, not in the CLI, so the trainer, the data code
and the GUI report an input problem without importing the command-line module.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input: printed as one clear line, exit code 2."""
