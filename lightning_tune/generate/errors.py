"""The one error generation raises for a request it cannot run (the CLI prints it as one `error:` line)."""


class GenerationError(ValueError):
    """A prompt, sampling setting or conversation the model cannot run; one line, no traceback needed."""
