"""User-facing errors.

A :class:`DemixError` is raised for anything the user can fix (a bad option, a missing file,
malformed audio). Command-line entry points print it as one line and exit non-zero instead of
showing a traceback.
"""
import functools
import logging
import sys
import typing as tp

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class DemixError(Exception):
    """An error caused by the user's input, with a message that names what to fix."""


def exit_on_user_error(func: tp.Callable) -> tp.Callable:
    """Decorate a command-line entry point: a :class:`DemixError` becomes one line on stderr
    and exit code 2, instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DemixError as error:
            print(f"demixlab: error: {error}", file=sys.stderr, flush=True)
            logger.debug("user error", exc_info=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
