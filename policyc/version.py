"""policyc's version, one place: the CLI, the plans' `compiler` field and the language server read it."""

__version__ = "0.1.0"
