"""Hook specifications: every extension point of rolora-plugin in one module.

Third-party packages extend rolora-plugin by exposing a module or object under the ``rolora`` entry-point group
(``[project.entry-points.rolora] myplugin = "mypkg.rolora_hooks"``) that implements some of these hooks with
``@rolora_plugin.hookimpl``. Built-in model families are registered through the very same hooks
(:mod:`rolora_plugin.model.architectures`). Hooks are always called with keyword arguments.
"""

from __future__ import annotations

import pluggy

__all__ = ["hookspec", "hookimpl", "PROJECT_NAME"]

PROJECT_NAME = "rolora"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def rolora_register_architectures():
    """Return a list of :class:`rolora_plugin.model.architectures.ArchitectureSpec` this plugin supports.

    Each spec says where a model family keeps its embeddings, norms, attention and MLP projections, so that
    :func:`rolora_plugin.rotate_model_` can rotate it exactly. Specs are matched on ``config.model_type``;
    a later-registered plugin wins over a built-in spec for the same model type.
    """


@hookspec(firstresult=True)
def rolora_hadamard_matrix(n):
    """Return an ``n × n`` ±1 Hadamard matrix (tensor or nested lists) for order ``n``, or None.

    Called for orders that are not a power of two, before the built-in Paley constructions, so a plugin can
    supply e.g. a Williamson matrix of order 172 to make width 11008 an exact Hadamard rotation instead of the
    random orthogonal fallback. The result is validated (±1 entries, ``H Hᵀ = n I``).
    """


@hookspec
def rolora_model_rotated(model, record):
    """Called after :func:`rolora_plugin.rotate_model_` has rotated ``model`` in place.

    ``record`` is the :class:`rolora_plugin.rotate.rotation.RotationRecord` written into ``model.config``. Use it to
    log, to register extra online modules, or to check custom invariants. Return value is ignored.
    """
