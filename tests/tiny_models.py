"""Transitional alias of :mod:`tests.helpers` (removed once every test imports from there)."""
from tests.helpers import FAMILIES, random_ids, tiny_config, tiny_model  # noqa: F401
