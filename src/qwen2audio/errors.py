"""Exception types users can catch: one per input family, all ``ValueError`` subclasses.

Front ends map :class:`InputError` to a client error (exit code 2, HTTP 400); anything else is a bug.
"""


class InputError(ValueError):
    """Something a user sent is wrong; the message names what and why."""


class AudioError(InputError):
    """Audio that cannot be used: empty, undecodable, too short or long, non-finite, not allowed."""


class PromptError(InputError):
    """A prompt or conversation that cannot be turned into model inputs."""


class ContextLengthError(PromptError):
    """A prompt longer than the model's context (OpenAI's ``context_length_exceeded``)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or loaded: missing files, bad config, wrong tensors."""


class AdapterError(InputError):
    """A LoRA adapter that cannot be used: unsupported features, shapes of another base model, a rank
    over the engine's limit, no free slot."""


class AdapterNotFoundError(AdapterError):
    """A request or an unload names an adapter that is not loaded (HTTP 404)."""
