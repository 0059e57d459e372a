"""Thin CLI commands over engine functions (one module per subcommand)."""
