"""The project's own errors: one base class, so that a caller (the CLI, a job, a notebook) can tell a problem that
bict-ray found and named from a bug.

Each error also subclasses the built-in exception a Python caller would expect (``ValueError`` for bad input,
``FileExistsError`` for something that is never overwritten), so ``except ValueError`` keeps working. The CLI prints
a ``BictError`` as one line and exits 2; anything else keeps its traceback.

Errors raised inside Ray tasks reach the driver wrapped in Ray's own exceptions, their message buried in a remote
traceback: ``project_error`` finds the original one again.
"""

from __future__ import annotations


class BictError(Exception):
    """A problem bict-ray detected; the message names what is wrong (file, row, key) and what to do."""


class InputError(BictError, ValueError):
    """Arguments a function cannot use: wrong shapes, dims, dtypes, ranges, or embeddings that are not unit length."""


class ConfigError(BictError, ValueError):
    """A config file or override that cannot be used; the message names the key and the problem."""


class DataError(BictError, ValueError):
    """A dataset that cannot be loaded or does not fit the config; the message names the file or folder."""


class GalleryError(BictError, ValueError):
    """A gallery version that cannot be read, written or upgraded as asked; the message names the file."""


class ArtifactError(BictError, ValueError):
    """A model or transform folder that is missing, corrupt or does not fit; the message names the file."""


class AlreadyExistsError(BictError, FileExistsError):
    """Something stored that bict-ray never overwrites (a trained model, a committed gallery version)."""


class NotFoundError(BictError, FileNotFoundError):
    """A stage's input that does not exist yet (a model not trained, a preset not shipped)."""


class StorageError(BictError, OSError):
    """A store (a disk, an object store) that failed to read or write: unreachable, full, refusing. The message names
    what was being written and the store's own words; the operation resumes when it is rerun once the store answers."""


class TrainingError(BictError, RuntimeError):
    """A training run that failed; the message names the stage, the model and the cause."""


def last_line(err: BaseException) -> str:
    """``err``'s message as one line, its last: where pyarrow puts the store's own words and a remote traceback the
    original error's (its type's name when the message is empty)."""
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def project_error(err: BaseException) -> BictError | None:
    """The outermost ``BictError`` in ``err``'s chain: ``err`` itself, or what it wraps; None if there is none.

    Follows the ``cause`` attribute of Ray's task errors, ``__cause__`` and ``__context__``, outside in. A Ray task
    error is itself an instance of the original error's class (Ray subclasses it dynamically), but its message is the
    whole remote traceback: the original instance it carries is taken instead, with the message the code raised.
    """
    seen, queue = set(), [err]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        inner = getattr(current, "cause", None)
        if isinstance(inner, BaseException):
            queue.append(inner)
            continue
        if isinstance(current, BictError):
            return current
        queue += [current.__cause__, current.__context__]
    return None
