"""The package's one exception family, so callers can catch everything it raises on purpose."""

from __future__ import annotations


class SparkMnistError(Exception):
    """Base of every error this package raises for bad input, configuration or a failed run."""


class ConfigError(SparkMnistError, ValueError):
    """A configuration file, field or command-line value is wrong; the message names it."""


class DataError(SparkMnistError, ValueError):
    """An input data file is missing, empty or malformed; the message names the file and line."""

    def __init__(
        self,
        path: str,
        problem: str,
        line_number: int | None = None,
        line_text: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = path
        self.problem = problem
        self.line_number = line_number
        self.line_text = line_text
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        from sparkml_mnist.redact import redact

        path = redact(self.path)
        where = path if self.line_number is None else f"{path}, line {self.line_number}"
        message = f"{where}: {self.problem}"
        if self.line_text is not None:
            message += f" [line: {_shorten(self.line_text)!r}]"
        if self.hint:
            message += f". {self.hint}"
        return message


class LaunchError(SparkMnistError, RuntimeError):
    """The distributed run could not start or a rank failed; the message names the rank and host."""


_SHOWN_LINE_CHARS = 80


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_LINE_CHARS else text[: _SHOWN_LINE_CHARS - 3] + "..."
