"""pluggy extension points: every hook is documented and tested; a third-party plugin installed through entry-point
metadata registers a new model family and rotates it end to end (datasette's ``tests/test_plugins.py`` is the model).
"""

from __future__ import annotations

import inspect
import sys
import textwrap

import pytest
import torch
from tests.helpers import random_ids, rel_err, tiny_model

from rolora_plugin import RotationConfig, UnsupportedArchitectureError, build_transform, hookimpl, hookspecs, rotate_model_
from rolora_plugin.plugins import ENTRY_POINT_GROUP, get_plugin_manager, reset_plugin_manager

HOOK_NAMES = sorted(name for name in get_plugin_manager().hook.__dict__ if name.startswith("rolora_"))
FLOAT32_FUNCTION_RTOL = 1e-5  # rotated vs original logits, float32 weights, float64 rotation maths


@pytest.fixture
def fresh_plugins():
    """A plugin manager rebuilt from the current environment, and rebuilt again after the test."""
    reset_plugin_manager()
    yield get_plugin_manager()
    reset_plugin_manager()


# ---------------------------------------------------------------------------------------------- meta-tests


def test_hook_names_found():
    assert HOOK_NAMES == sorted(n for n, f in vars(hookspecs).items() if n.startswith("rolora_") and callable(f))
    assert len(HOOK_NAMES) >= 3


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hook_is_documented(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    assert len(doc.split()) >= 15, f"hookspec {name} needs a docstring saying what to return and when it is called"
    for arg in inspect.signature(spec).parameters:
        assert f"``{arg}``" in doc, f"hookspec {name}: document its argument ``{arg}`` in the docstring"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hook_has_a_test(name):
    test = globals().get(f"test_hook_{name}")
    assert callable(test), f"add a test named test_hook_{name} to tests/test_plugins.py"
    # the test (or plugin source text it installs) must implement the hook
    sources = [inspect.getsource(test)] + [v for k in test.__code__.co_names if isinstance(v := globals().get(k), str)]
    assert any(f"def {name}(" in s for s in sources), f"test_hook_{name} must implement {name} in a plugin"


# ---------------------------------------------------------------------------------------------- a third-party package

PLUGIN_SOURCE = '''
"""A third-party rolora plugin: adds IBM Granite (llama layout plus scalar multipliers, which commute with R1)."""
from rolora_plugin import ArchitectureSpec, hookimpl

GRANITE = ArchitectureSpec(name="granite-thirdparty", model_types=("granite",))


@hookimpl
def rolora_register_architectures():
    return [GRANITE]
'''


def _install_dist(root, name: str, module: str, source: str) -> None:
    """Write a minimal installed distribution (module + dist-info with a ``rolora`` entry point) into ``root``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {module}\n")
    (info / "top_level.txt").write_text(module + "\n")


def tiny_granite(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.GraniteConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=101, tie_word_embeddings=True, embedding_multiplier=3.0, residual_multiplier=0.5,
        attention_multiplier=0.3, logits_scaling=2.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_hook_rolora_register_architectures(tmp_path, monkeypatch, fresh_plugins):
    model = tiny_granite()
    with pytest.raises(UnsupportedArchitectureError, match="granite"):
        rotate_model_(model, RotationConfig(seed=1), progress=False)

    _install_dist(tmp_path, "rolora-granite", "rolora_granite", PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rolora_granite", raising=False)
    reset_plugin_manager()
    assert "rolora-granite" in dict(get_plugin_manager().list_name_plugin())

    ids = random_ids()
    with torch.no_grad():
        before = model(ids).logits
        record = rotate_model_(model, RotationConfig(seed=1, r2=True), progress=False)
        after = model(ids).logits
    assert record.family == "granite-thirdparty"
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert rel_err(after, before) < FLOAT32_FUNCTION_RTOL
    assert rel_err(model.lm_head.weight, tiny_granite().lm_head.weight) > 0.1  # the weights really changed


def test_hook_rolora_hadamard_matrix(fresh_plugins):
    calls = []

    class RowPermutedPaley12:
        @hookimpl
        def rolora_hadamard_matrix(self, n):
            calls.append(n)
            if n != 12:
                return None
            from rolora_plugin.hadamard.constructions import paley

            return paley(12).flip(0)  # a different (row-permuted) Hadamard matrix of order 12

    fresh_plugins.register(RowPermutedPaley12())
    t = build_transform(48)  # 48 = 12 · 4: the order-12 factor now comes from the plugin
    assert 12 in calls and "plugin12" in t.description
    x = torch.randn(3, 48, dtype=torch.float64)
    assert rel_err(t.apply_transposed(t.apply(x)), x) < 1e-12


def test_hadamard_hook_result_is_validated(fresh_plugins):
    class Broken:
        @hookimpl
        def rolora_hadamard_matrix(self, n):
            return torch.ones(n, n)

    fresh_plugins.register(Broken())
    with pytest.raises(ValueError, match="invalid Hadamard matrix"):
        build_transform(12)


def test_hook_rolora_model_rotated(fresh_plugins):
    seen = []

    class Listener:
        @hookimpl
        def rolora_model_rotated(self, model, record):
            seen.append((model, record.to_dict(), dict(model.config.rolora)))

    fresh_plugins.register(Listener())
    model = tiny_model("llama")
    record = rotate_model_(model, RotationConfig(seed=3), progress=False)
    assert len(seen) == 1
    hooked_model, hooked_record, config_record = seen[0]
    assert hooked_model is model and hooked_record == record.to_dict() == config_record


def test_rotation_agreement_check_is_noop_in_one_process():
    from rolora_plugin.integrations.deepspeed import check_rank_agreement, record_digest

    model = tiny_model("llama")
    record = rotate_model_(model, RotationConfig(seed=3), progress=False)
    check_rank_agreement(record, model=model)
    assert record_digest(record) == record_digest(record.to_dict())
    assert record_digest(record) != record_digest(rotate_model_(tiny_model("llama"), RotationConfig(seed=4), progress=False))
