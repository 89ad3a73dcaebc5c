"""The command-line interface: thin commands that parse, call one function and render errors."""
