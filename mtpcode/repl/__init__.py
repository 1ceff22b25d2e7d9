"""The interactive REPL: editing helpers, live suggestions and the prompt-toolkit UI."""
