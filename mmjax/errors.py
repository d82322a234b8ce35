"""The project's own error types. Everything mmjax raises on bad input is one of these
(or a ValueError subclass of them), and every message names the offending thing."""


class MmjaxError(Exception):
    """Base of every error mmjax raises on purpose."""


class CheckpointError(MmjaxError, ValueError):
    """A source checkpoint file is malformed, unsafe, or inconsistent."""


class ConversionError(MmjaxError, ValueError):
    """The rules do not map the source tensors onto the model's parameters exactly."""


class UnknownModelError(MmjaxError, ValueError):
    """config.json names a model_type (or --model) that no registered family handles."""


class LoadError(MmjaxError, ValueError):
    """A converted mmjax folder is missing files, corrupted, or does not match its config."""


class InputError(MmjaxError, ValueError):
    """A generation input (image, prompt, sampling parameter) is invalid."""


class AutoportError(MmjaxError, ValueError):
    """A torch module cannot be auto-ported (mmjax.autoport): torch.export failed, an op has no
    JAX lowering, or a port does not fit the inputs it is given."""
